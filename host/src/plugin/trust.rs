//! Which plugin files the host trusts: the way ssh's `StrictModes` trusts
//! keys.
//!
//! Whoever can change a plugin file, or swap it by replacing an entry on
//! its path, runs code in the host (often as root). So the file, the real
//! path it resolves to after symlinks, and every directory passed through
//! from `/` must be owned by root or by the user the host runs as, and
//! writable by neither group nor others.
//!
//! One relaxation of ssh's rule, which refuses any path through `/tmp`: a
//! sticky directory (`/tmp`, `/dev/shm`, mode 1777) may be passed
//! through when what the path takes in it is owned by root or the host's
//! user, since the sticky bit lets nobody else rename or remove that. The
//! host's private copies of the plugins live under `/dev/shm`, and test
//! scratch directories under `/tmp`. The directory that holds a plugin
//! never gets that relaxation: anyone could add a file there.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};

/// Which plugin files the host trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trust {
    /// Those owned by root or the host's user, on a path only they can
    /// change (the default; see the module's documentation).
    #[default]
    OwnerOnly,
    /// Any (`--allow-insecure-plugins`).
    AnyPermissions,
}

/// Symlinks followed at most on one path (Linux's own limit).
const MAX_SYMLINKS: u32 = 40;

/// Group- and other-write permission bits.
const WRITABLE_BY_OTHERS: u32 = 0o022;

/// The sticky bit.
const STICKY: u32 = 0o1000;

/// The users whose files are trusted: root and the user the host runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owners {
    host: u32,
}

impl Owners {
    /// Root and this process's effective user.
    pub fn of_this_process() -> Self {
        Self {
            host: rustix::process::geteuid().as_raw(),
        }
    }

    /// Root and `uid`, as if the host ran as `uid`.
    pub fn with_host_user(uid: u32) -> Self {
        Self { host: uid }
    }

    fn trust(self, uid: u32) -> bool {
        uid == 0 || uid == self.host
    }
}

/// What a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// Anything else (a socket, a device, a FIFO).
    Other,
}

impl Kind {
    fn of(metadata: &Metadata) -> Self {
        let t = metadata.file_type();
        if t.is_symlink() {
            Kind::Symlink
        } else if t.is_dir() {
            Kind::Directory
        } else if t.is_file() {
            Kind::File
        } else {
            Kind::Other
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::File => "file",
            Kind::Directory => "directory",
            Kind::Symlink => "symlink",
            Kind::Other => "special file",
        })
    }
}

/// A user, for messages: `root`, `nobody (uid 65534)`, or `uid 1234`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User(pub u32);

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, user_name(self.0)) {
            (0, _) => f.write_str("root"),
            (uid, Some(name)) => write!(f, "{name} (uid {uid})"),
            (uid, None) => write!(f, "uid {uid}"),
        }
    }
}

/// The name `/etc/passwd` gives `uid`, if any (no NSS: the message only
/// reads better with it).
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}

/// Who runs the host, for messages.
struct HostUsers(u32);

impl fmt::Display for HostUsers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("root, who runs the host"),
            uid => write!(f, "root or {}, who runs the host", User(uid)),
        }
    }
}

/// Why a path is not trusted: one line naming the path and the reason.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// Owned by someone other than root and the host's user.
    #[error(
        "{kind} {} is owned by {}, not by {}: its owner can change the code the host runs; \
         `chown` it, or pass --allow-insecure-plugins",
        path.display(), User(*owner), HostUsers(*host)
    )]
    Owner {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: Kind,
        /// Its owner.
        owner: u32,
        /// The user the host runs as.
        host: u32,
    },
    /// Group or others may write it.
    #[error(
        "{kind} {} is writable by group or others (mode {mode:o}): whoever can write to it can \
         change the code the host runs; `chmod go-w` it, or pass --allow-insecure-plugins",
        path.display()
    )]
    Writable {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: Kind,
        /// Its permission bits.
        mode: u32,
    },
    /// Not what it should be (a plugin that is a FIFO, a directory that is
    /// a file).
    #[error("{} is a {found}, not a {expected}", path.display())]
    Not {
        /// The path.
        path: PathBuf,
        /// What it should be.
        expected: Kind,
        /// What it is.
        found: Kind,
    },
    /// A symlink loop, or too long a chain.
    #[error("{}: more than {MAX_SYMLINKS} symlinks on the way", path.display())]
    SymlinkLoop {
        /// The path asked about.
        path: PathBuf,
    },
    /// A path on the way cannot be examined.
    #[error("cannot examine {}: {error}", path.display())]
    Unreadable {
        /// The path.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// A path found trustworthy.
#[derive(Debug)]
pub struct Checked {
    /// Where it really is: absolute, no symlink, no `.` or `..`.
    pub real: PathBuf,
    /// What it is, as checked.
    pub metadata: Metadata,
}

/// How a directory that was passed through may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Passage {
    /// Only trusted users can change it.
    Closed,
    /// Sticky and writable by others: trusted only for the entries that
    /// trusted users own, and never as the home of a plugin.
    Sticky,
}

/// One step of a path being resolved.
enum Step {
    Root,
    Up,
    Name(OsString),
}

fn steps(path: &Path) -> impl DoubleEndedIterator<Item = Step> + '_ {
    path.components().filter_map(|c| match c {
        Component::RootDir => Some(Step::Root),
        Component::ParentDir => Some(Step::Up),
        Component::Normal(name) => Some(Step::Name(name.to_owned())),
        Component::CurDir | Component::Prefix(_) => None,
    })
}

/// Checks that `path`, a `expected` (the plugin directory, or a plugin
/// file), is trusted: resolves it one entry at a time as the kernel does,
/// checking every directory an entry is looked up in, every symlink
/// followed through a sticky directory, and what it resolves to.
pub fn check(path: &Path, expected: Kind, owners: Owners) -> Result<Checked, Untrusted> {
    let unreadable = |path: &Path, error| Untrusted::Unreadable {
        path: path.to_owned(),
        error,
    };
    let absolute = std::path::absolute(path).map_err(|e| unreadable(path, e))?;
    let mut pending: VecDeque<Step> = steps(&absolute).collect();
    let mut real = PathBuf::from("/");
    let mut passages: HashMap<PathBuf, Passage> = HashMap::new();
    let mut symlinks = 0u32;
    while let Some(step) = pending.pop_front() {
        let name = match step {
            Step::Root => {
                real = PathBuf::from("/");
                continue;
            }
            Step::Up => {
                real.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        let passage = match passages.get(&real) {
            Some(p) => *p,
            None => {
                let p = passage(&real, owners)?;
                passages.insert(real.clone(), p);
                p
            }
        };
        let next = real.join(&name);
        let metadata = std::fs::symlink_metadata(&next).map_err(|e| unreadable(&next, e))?;
        if passage == Passage::Sticky && !owners.trust(metadata.uid()) {
            return Err(Untrusted::Owner {
                path: next,
                kind: Kind::of(&metadata),
                owner: metadata.uid(),
                host: owners.host,
            });
        }
        if metadata.file_type().is_symlink() {
            symlinks += 1;
            if symlinks > MAX_SYMLINKS {
                return Err(Untrusted::SymlinkLoop { path: absolute });
            }
            let target = std::fs::read_link(&next).map_err(|e| unreadable(&next, e))?;
            // Resolved from the directory that holds the link, or from `/`.
            for step in steps(&target).rev() {
                pending.push_front(step);
            }
            continue;
        }
        real = next;
    }

    let metadata = std::fs::symlink_metadata(&real).map_err(|e| unreadable(&real, e))?;
    let found = Kind::of(&metadata);
    if found != expected {
        return Err(Untrusted::Not {
            path: real,
            expected,
            found,
        });
    }
    trusted(&real, &metadata, owners)?;
    let mode = metadata.mode() & 0o7777;
    if mode & WRITABLE_BY_OTHERS != 0 {
        return Err(Untrusted::Writable {
            path: real,
            kind: found,
            mode,
        });
    }
    // The directory that holds a plugin file: sticky is not enough there,
    // as anyone could add a look-alike beside it. (A plugin directory may
    // sit in a sticky one: nobody else can rename or remove it.)
    if let Some(holder) = real.parent().filter(|_| expected == Kind::File) {
        if passages.get(holder) == Some(&Passage::Sticky) {
            let mode = std::fs::symlink_metadata(holder)
                .map_err(|e| unreadable(holder, e))?
                .mode()
                & 0o7777;
            return Err(Untrusted::Writable {
                path: holder.to_owned(),
                kind: Kind::Directory,
                mode,
            });
        }
    }
    Ok(Checked { real, metadata })
}

/// Checks a directory an entry is looked up in.
fn passage(dir: &Path, owners: Owners) -> Result<Passage, Untrusted> {
    let metadata = std::fs::symlink_metadata(dir).map_err(|error| Untrusted::Unreadable {
        path: dir.to_owned(),
        error,
    })?;
    trusted(dir, &metadata, owners)?;
    let mode = metadata.mode() & 0o7777;
    if mode & WRITABLE_BY_OTHERS == 0 {
        Ok(Passage::Closed)
    } else if mode & STICKY != 0 {
        Ok(Passage::Sticky)
    } else {
        Err(Untrusted::Writable {
            path: dir.to_owned(),
            kind: Kind::Directory,
            mode,
        })
    }
}

fn trusted(path: &Path, metadata: &Metadata, owners: Owners) -> Result<(), Untrusted> {
    if owners.trust(metadata.uid()) {
        Ok(())
    } else {
        Err(Untrusted::Owner {
            path: path.to_owned(),
            kind: Kind::of(metadata),
            owner: metadata.uid(),
            host: owners.host,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{chown, symlink, PermissionsExt as _};

    use super::*;

    const NOBODY: u32 = 65534;

    /// A scratch directory (0700, ours) under the temporary directory.
    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn owners() -> Owners {
        Owners::of_this_process()
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// `dir/plugins/libp.so`, 0755 and 0644.
    fn plugin_in(dir: &Path) -> PathBuf {
        let plugins = dir.join("plugins");
        std::fs::create_dir(&plugins).expect("mkdir");
        chmod(&plugins, 0o755);
        let file = plugins.join("libp.so");
        std::fs::write(&file, b"x").expect("write");
        chmod(&file, 0o644);
        file
    }

    #[test]
    fn a_plugin_only_its_owner_can_change_is_trusted() {
        let dir = scratch();
        let file = plugin_in(dir.path());
        let checked = check(&file, Kind::File, owners()).expect("trusted");
        assert_eq!(checked.real, file);
        check(file.parent().expect("dir"), Kind::Directory, owners()).expect("trusted");
        // Its own directory sits in the temporary directory, sticky (1777)
        // on most systems.
        check(dir.path(), Kind::Directory, owners()).expect("a plugin directory in /tmp");
    }

    #[test]
    fn writable_by_group_or_others_is_refused_naming_the_path() {
        let dir = scratch();
        let file = plugin_in(dir.path());
        chmod(&file, 0o664);
        let e = check(&file, Kind::File, owners()).expect_err("group-writable file");
        assert!(
            e.to_string().starts_with(&format!(
                "file {} is writable by group or others (mode 664)",
                file.display()
            )),
            "{e}"
        );
        chmod(&file, 0o644);
        let plugins = file.parent().expect("dir");
        chmod(plugins, 0o775);
        let e = check(&file, Kind::File, owners()).expect_err("group-writable directory");
        assert!(
            e.to_string().starts_with(&format!(
                "directory {} is writable by group or others (mode 775)",
                plugins.display()
            )),
            "{e}"
        );
        // An ancestor, too.
        chmod(plugins, 0o755);
        chmod(dir.path(), 0o757);
        let e = check(&file, Kind::File, owners()).expect_err("writable ancestor");
        assert!(e.to_string().contains("(mode 757)"), "{e}");
    }

    #[test]
    fn a_symlink_is_judged_by_where_it_leads() {
        let dir = scratch();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        chmod(&open, 0o777);
        std::fs::write(open.join("libp.so"), b"x").expect("write");
        chmod(&open.join("libp.so"), 0o644);
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).expect("mkdir");
        // Relative, through `..`, and a second hop.
        symlink("../open/libp.so", plugins.join("hop.so")).expect("symlink");
        symlink("hop.so", plugins.join("libp.so")).expect("symlink");
        let e = check(&plugins.join("libp.so"), Kind::File, owners()).expect_err("0777 target");
        assert!(
            e.to_string().starts_with(&format!(
                "directory {} is writable by group or others (mode 777)",
                open.display()
            )),
            "{e}"
        );
        chmod(&open, 0o755);
        let checked = check(&plugins.join("libp.so"), Kind::File, owners()).expect("trusted");
        assert_eq!(checked.real, open.join("libp.so"));
    }

    #[test]
    fn a_symlink_loop_is_refused() {
        let dir = scratch();
        symlink("b.so", dir.path().join("a.so")).expect("symlink");
        symlink("a.so", dir.path().join("b.so")).expect("symlink");
        let e = check(&dir.path().join("a.so"), Kind::File, owners()).expect_err("loop");
        assert!(matches!(e, Untrusted::SymlinkLoop { .. }), "{e}");
    }

    #[test]
    fn a_sticky_directory_may_be_passed_through_but_never_hold_a_plugin() {
        let dir = scratch();
        let sticky = dir.path().join("sticky");
        std::fs::create_dir(&sticky).expect("mkdir");
        chmod(&sticky, 0o1777);
        let file = plugin_in(&sticky);
        check(&file, Kind::File, owners()).expect("passed through");
        let plugins = file.parent().expect("dir");
        std::fs::rename(&file, sticky.join("libp.so")).expect("move");
        let e = check(&sticky.join("libp.so"), Kind::File, owners()).expect_err("held");
        assert!(e.to_string().contains("(mode 1777)"), "{e}");
        let e = check(&sticky, Kind::Directory, owners()).expect_err("as the plugin directory");
        assert!(e.to_string().contains("(mode 1777)"), "{e}");
        std::fs::remove_dir(plugins).expect("rmdir");
    }

    #[test]
    fn what_the_path_takes_in_a_sticky_directory_must_be_trusted_too() {
        if !is_root() {
            eprintln!("not root: cannot give files away to test ownership; skipped");
            return;
        }
        let dir = scratch();
        let sticky = dir.path().join("sticky");
        std::fs::create_dir(&sticky).expect("mkdir");
        chmod(&sticky, 0o1777);
        let file = plugin_in(&sticky);
        let plugins = file.parent().expect("dir");
        chown(plugins, Some(NOBODY), None).expect("chown");
        let e = check(&file, Kind::File, owners()).expect_err("nobody's directory");
        assert!(
            e.to_string().starts_with(&format!(
                "directory {} is owned by nobody (uid 65534), not by root, who runs the host",
                plugins.display()
            )),
            "{e}"
        );
        // A symlink nobody owns, in a sticky directory: nobody can replace it.
        chown(plugins, Some(0), None).expect("chown");
        let link = sticky.join("link");
        symlink("plugins", &link).expect("symlink");
        std::os::unix::fs::lchown(&link, Some(NOBODY), None).expect("lchown");
        let e = check(&link.join("libp.so"), Kind::File, owners()).expect_err("nobody's link");
        assert!(e.to_string().starts_with("symlink"), "{e}");
    }

    #[test]
    fn files_and_directories_of_other_users_are_refused() {
        if !is_root() {
            eprintln!("not root: cannot give files away to test ownership; skipped");
            return;
        }
        let dir = scratch();
        let file = plugin_in(dir.path());
        chown(&file, Some(NOBODY), None).expect("chown");
        let e = check(&file, Kind::File, owners()).expect_err("nobody's file");
        assert!(
            e.to_string().starts_with(&format!(
                "file {} is owned by nobody (uid 65534), not by root, who runs the host",
                file.display()
            )),
            "{e}"
        );
        // The host's own user is trusted, as is root.
        check(&file, Kind::File, Owners::with_host_user(NOBODY)).expect("the host's user");
        let e = check(&file, Kind::File, Owners::with_host_user(1000)).expect_err("other");
        assert!(e.to_string().contains("not by root or "), "{e}");
        assert!(
            e.to_string().contains("uid 1000), who runs the host"),
            "{e}"
        );
        chown(&file, Some(0), None).expect("chown");
        chown(dir.path(), Some(NOBODY), None).expect("chown");
        let e = check(&file, Kind::File, owners()).expect_err("nobody's ancestor");
        assert!(e.to_string().starts_with("directory"), "{e}");
        chown(dir.path(), Some(0), None).expect("chown");
    }

    #[test]
    fn a_plugin_must_be_a_regular_file() {
        let dir = scratch();
        let e = check(dir.path(), Kind::File, owners()).expect_err("a directory");
        assert!(e.to_string().ends_with("is a directory, not a file"), "{e}");
        let e = check(&dir.path().join("missing.so"), Kind::File, owners()).expect_err("missing");
        assert!(e.to_string().starts_with("cannot examine"), "{e}");
    }
}
