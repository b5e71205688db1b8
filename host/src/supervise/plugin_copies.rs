//! The private copies of the plugins that workers load: one set per roll,
//! in the work directory.
//!
//! A worker never maps a file of the plugin directory: `cp` over a loaded
//! `.so` rewrites the pages every worker has mapped, and they all die of
//! SIGBUS at once (their restarts then load whatever is on disk, never
//! checked). At start and at every SIGHUP the supervisor checks the plugins
//! (see [`crate::plugin::trust`]) and copies the trusted ones, read-only,
//! into a fresh `plugins-<roll>/`; every worker of that roll, restarts
//! included, loads those copies, so what was checked is what runs. A
//! roll's copies are removed once no worker uses them, and all at exit.

use std::collections::BTreeSet;
use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::StatVfsMountFlags;

use super::{work_dir, SupervisorError};
use crate::plugin::trust::{self, Checked, Kind, Owners, Trust};
use crate::plugin::{DirError, LoadError, PluginSet};

/// One roll's copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Copies {
    /// Which roll took them (1 at start, one more at each SIGHUP).
    pub(super) roll: u64,
    /// Where they are: what workers get as their plugin directory.
    pub(super) dir: PathBuf,
    /// The plugin directory they were taken from.
    origin: PathBuf,
}

impl Copies {
    /// The plugin file `copy` was taken from, for messages.
    pub(super) fn original(&self, copy: &Path) -> PathBuf {
        match copy.strip_prefix(&self.dir) {
            Ok(name) => self.origin.join(name),
            Err(_) => copy.to_owned(),
        }
    }
}

/// What checking and copying the plugin directory gave.
#[derive(Debug)]
pub(super) struct Taken {
    pub(super) copies: Copies,
    /// How many files were copied.
    pub(super) copied: usize,
    /// The files refused as untrusted, never copied.
    pub(super) refused: Vec<LoadError>,
}

/// Every roll's copies still in use.
#[derive(Debug)]
pub(super) struct PluginCopies {
    base: PathBuf,
    /// `base` was made for the copies alone, as the work directory's file
    /// system forbids running code: it goes at exit too.
    own_base: bool,
    trust: Trust,
    next_roll: u64,
    current: Option<Copies>,
    older: Vec<Copies>,
}

impl PluginCopies {
    /// Copies go to `work_dir`, or to a directory of their own in the
    /// temporary directory where `work_dir` is on a file system mounted
    /// `noexec` (Docker's `/dev/shm`), where no library can be loaded.
    pub(super) fn new(work_dir: &Path, trust: Trust) -> Result<Self, SupervisorError> {
        let (base, own_base) = if allows_code(work_dir) {
            (work_dir.to_owned(), false)
        } else {
            let temp = std::env::temp_dir();
            if !allows_code(&temp) {
                return Err(SupervisorError::NoExec {
                    work_dir: work_dir.to_owned(),
                    temp,
                });
            }
            let base = work_dir::create_in(&temp)?;
            tracing::info!(
                work_dir = %work_dir.display(), copies = %base.display(),
                "the work directory's file system is mounted noexec: plugin copies go to the temporary directory"
            );
            (base, true)
        };
        Ok(Self {
            base,
            own_base,
            trust,
            next_roll: 1,
            current: None,
            older: Vec::new(),
        })
    }

    /// The copies new workers load.
    pub(super) fn current(&self) -> Option<&Copies> {
        self.current.as_ref()
    }

    /// Checks the plugin directory `origin` and each plugin in it, and
    /// copies the trusted ones, read-only, into a fresh directory for the
    /// next roll (not yet [`Self::adopt`]ed).
    pub(super) fn take(&mut self, origin: &Path) -> Result<Taken, SupervisorError> {
        let owners = Owners::of_this_process();
        let files = PluginSet::plugin_files(origin)?;
        if self.trust == Trust::OwnerOnly {
            trust::check(origin, Kind::Directory, owners).map_err(|why| DirError::Untrusted {
                dir: origin.to_owned(),
                why,
            })?;
        }
        let roll = self.next_roll;
        self.next_roll += 1;
        let dir = self.base.join(format!("plugins-{roll}"));
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| SupervisorError::WorkDir {
                path: dir.clone(),
                source,
            })?;
        let mut taken = Taken {
            copies: Copies {
                roll,
                dir,
                origin: origin.to_owned(),
            },
            copied: 0,
            refused: Vec::new(),
        };
        match self.fill(&mut taken, files, owners) {
            Ok(()) => Ok(taken),
            Err(e) => {
                self.discard(&taken.copies);
                Err(e)
            }
        }
    }

    fn fill(
        &self,
        taken: &mut Taken,
        files: Vec<PathBuf>,
        owners: Owners,
    ) -> Result<(), SupervisorError> {
        let dir = &taken.copies.dir;
        if self.trust == Trust::OwnerOnly {
            // What workers load must be as safe as what was checked.
            trust::check(dir, Kind::Directory, owners).map_err(|why| {
                SupervisorError::CopiesUntrusted {
                    dir: dir.clone(),
                    why,
                }
            })?;
        }
        for file in files {
            let checked = match self.trust {
                Trust::OwnerOnly => match trust::check(&file, Kind::File, owners) {
                    Ok(checked) => Some(checked),
                    Err(why) => {
                        taken.refused.push(LoadError {
                            path: file,
                            kind: why.into(),
                        });
                        continue;
                    }
                },
                Trust::AnyPermissions => None,
            };
            let Some(name) = file.file_name() else {
                continue;
            };
            let to = dir.join(name);
            copy(&file, checked.as_ref(), &to).map_err(|error| SupervisorError::Copy {
                from: file.clone(),
                to,
                error,
            })?;
            taken.copied += 1;
        }
        Ok(())
    }

    /// Makes `copies` the ones new workers load; the previous ones stay
    /// while workers use them (see [`Self::sweep`]).
    pub(super) fn adopt(&mut self, copies: Copies) {
        tracing::debug!(roll = copies.roll, dir = %copies.dir.display(), "workers load the plugin copies of this roll");
        if let Some(previous) = self.current.replace(copies) {
            self.older.push(previous);
        }
    }

    /// Removes copies that were not adopted (a reload refused).
    pub(super) fn discard(&self, copies: &Copies) {
        remove(copies);
    }

    /// Removes older rolls' copies that no worker uses any more (`in_use`:
    /// the rolls of the workers alive).
    pub(super) fn sweep(&mut self, in_use: &BTreeSet<u64>) {
        self.older.retain(|copies| {
            let used = in_use.contains(&copies.roll);
            if !used {
                remove(copies);
            }
            used
        });
    }

    /// Removes every copy, at exit.
    pub(super) fn remove_all(&mut self) {
        for copies in self.older.drain(..).chain(self.current.take()) {
            remove(&copies);
        }
        if self.own_base {
            if let Err(e) = std::fs::remove_dir_all(&self.base) {
                tracing::warn!(dir = %self.base.display(), error = %e, "cannot remove the plugin copies' directory");
            }
        }
    }
}

fn remove(copies: &Copies) {
    match std::fs::remove_dir_all(&copies.dir) {
        Ok(()) => {
            tracing::debug!(roll = copies.roll, dir = %copies.dir.display(), "plugin copies removed")
        }
        Err(e) => {
            tracing::warn!(roll = copies.roll, dir = %copies.dir.display(), error = %e, "cannot remove plugin copies")
        }
    }
}

/// Whether libraries can be loaded from `dir`'s file system (not mounted
/// `noexec`). When it cannot tell, it says yes: loading then fails with
/// the loader's own message.
fn allows_code(dir: &Path) -> bool {
    rustix::fs::statvfs(dir).map_or(true, |fs| !fs.f_flag.contains(StatVfsMountFlags::NOEXEC))
}

/// Copies plugin `from` to a new read-only file `to`. Reads the file that
/// was `checked`, not whatever the path names now: a rename between the
/// check and the copy is an error (a SIGHUP again takes the new one).
fn copy(from: &Path, checked: Option<&Checked>, to: &Path) -> std::io::Result<()> {
    let mut source = File::open(checked.map_or(from, |c| c.real.as_path()))?;
    if let Some(checked) = checked {
        let opened = source.metadata()?;
        if (opened.dev(), opened.ino()) != (checked.metadata.dev(), checked.metadata.ino()) {
            return Err(std::io::Error::other(
                "it was replaced while being checked; send SIGHUP again to take the new one",
            ));
        }
    }
    let mut target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(to)?;
    std::io::copy(&mut source, &mut target)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn plugin_dir(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for name in files {
            std::fs::write(dir.path().join(name), name.as_bytes()).expect("write");
        }
        dir
    }

    #[test]
    fn each_roll_copies_what_was_checked_read_only_and_unused_rolls_go() {
        let origin = plugin_dir(&["liba.so", "libb.so", "notes.txt"]);
        let work = tempfile::tempdir().expect("temp dir");
        let mut copies = PluginCopies::new(work.path(), Trust::OwnerOnly).expect("copies");
        let first = copies.take(origin.path()).expect("take");
        assert_eq!((first.copied, first.refused.len()), (2, 0));
        let a = first.copies.dir.join("liba.so");
        assert_eq!(std::fs::read(&a).expect("copy"), b"liba.so");
        let mode = std::fs::metadata(&a).expect("copy").permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
        assert!(!first.copies.dir.join("notes.txt").exists());
        assert_eq!(first.copies.original(&a), origin.path().join("liba.so"));
        copies.adopt(first.copies.clone());

        // Overwritten in place: the copy keeps what was checked.
        std::fs::write(origin.path().join("liba.so"), b"new").expect("overwrite");
        assert_eq!(std::fs::read(&a).expect("copy"), b"liba.so");

        let second = copies.take(origin.path()).expect("take");
        assert_eq!(
            std::fs::read(second.copies.dir.join("liba.so")).expect("copy"),
            b"new"
        );
        copies.adopt(second.copies.clone());
        assert_eq!(copies.current(), Some(&second.copies));
        // A worker of the first roll still runs: its copies stay.
        copies.sweep(&BTreeSet::from([1, 2]));
        assert!(first.copies.dir.exists());
        copies.sweep(&BTreeSet::from([2]));
        assert!(!first.copies.dir.exists());
        // The current roll's copies stay even with no worker.
        copies.sweep(&BTreeSet::new());
        assert!(second.copies.dir.exists());
        copies.remove_all();
        assert!(!second.copies.dir.exists());
    }

    #[test]
    fn untrusted_plugins_are_refused_and_not_copied() {
        let origin = plugin_dir(&["liba.so", "libb.so"]);
        let b = origin.path().join("libb.so");
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let work = tempfile::tempdir().expect("temp dir");
        let mut copies = PluginCopies::new(work.path(), Trust::OwnerOnly).expect("copies");
        let taken = copies.take(origin.path()).expect("take");
        assert_eq!(taken.copied, 1);
        assert_eq!(taken.refused.len(), 1);
        assert!(
            taken.refused[0].to_string().contains("(mode 666)"),
            "{}",
            taken.refused[0]
        );
        assert!(!taken.copies.dir.join("libb.so").exists());

        let other = tempfile::tempdir().expect("temp dir");
        let mut any = PluginCopies::new(other.path(), Trust::AnyPermissions).expect("copies");
        let taken = any.take(origin.path()).expect("take");
        assert_eq!((taken.copied, taken.refused.len()), (2, 0));

        // An untrusted plugin directory: nothing copied, nothing left.
        std::fs::set_permissions(origin.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let e = copies.take(origin.path()).expect_err("0777 directory");
        assert!(e.to_string().contains("(mode 777)"), "{e}");
        let left: Vec<_> = std::fs::read_dir(work.path())
            .expect("work dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["plugins-1"], "{left:?}");
    }
}
