//! The names of the host's own reply queues, and what tells a reply queue
//! that a dead host left behind from one still in use.
//!
//! A reply queue (on RabbitMQ a queue and its direct exchange, on Redis a
//! list) is named `commissaire-host-reply-<hostname>-<pid>-<8 hex digits>`.
//! A Python service that replies there declares it again (and on Redis
//! leaves binding sets): the host deletes all of it when its connection
//! closes. A host killed before that leaves it behind; the next host
//! process on the same machine and broker deletes the ones of its machine
//! whose process is gone, or whose process is itself but no connection of
//! it uses them any more (a connection lost and made again). Leftovers of
//! other machines are for the operator (docs/transports.md, "Reply queues").

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

/// What every reply queue name starts with.
pub const PREFIX: &str = "commissaire-host-reply-";

/// Where the host's own requests wait for their replies (`[bus]
/// reply_queue`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyQueueKind {
    /// A queue of the connection's own, declared as kombu's `SimpleQueue`
    /// declares it (durable, no arguments, with a direct exchange of the
    /// same name), so that an original Python service can reply to it;
    /// deleted at close.
    #[default]
    Named,
    /// RabbitMQ's direct reply-to: nothing to declare or delete, somewhat
    /// faster, but an original Python service cannot reply to it (its
    /// `SimpleQueue` declaration fails). Redis has no such thing: there the
    /// host uses a named list either way.
    Direct,
}

/// Names used by this process's open connections.
fn in_use() -> MutexGuard<'static, HashSet<String>> {
    static IN_USE: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    IN_USE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// A fresh reply queue name of this process, in use until dropped.
#[derive(Debug)]
pub struct ReplyName(String);

impl ReplyName {
    /// A new name.
    pub fn new() -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{}{}-{}", local_prefix(), std::process::id(), &tag[..8]);
        in_use().insert(name.clone());
        Self(name)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ReplyName {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ReplyName {
    fn drop(&mut self) {
        in_use().remove(&self.0);
    }
}

/// This machine's host name, as it appears in reply queue names: only
/// letters, digits, `.` and `-` (so it is also a plain Redis `SCAN`
/// pattern).
fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let clean: String = raw
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if clean.is_empty() {
            "localhost".to_owned()
        } else {
            clean
        }
    })
}

/// `commissaire-host-reply-<hostname>-`: the reply queues of this machine.
pub fn local_prefix() -> String {
    format!("{PREFIX}{}-", hostname())
}

/// Whether process `pid` of this machine runs. Without `/proc` nothing can
/// be told, and every process counts as running (nothing is swept).
fn running(pid: u32) -> bool {
    let proc = std::path::Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Whether `name` is a reply queue of this machine that no running
/// connection uses: its process is gone, or it is this process and none
/// of its connections holds the name.
pub fn is_abandoned(name: &str) -> bool {
    let Some((pid, tag)) = name
        .strip_prefix(local_prefix().as_str())
        .and_then(|rest| rest.split_once('-'))
    else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    if tag.len() != 8 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    if pid == std::process::id() {
        !in_use().contains(name)
    } else {
        !running(pid)
    }
}

/// Where each process notes the RabbitMQ reply queues it declares, one
/// file per queue named after it and holding the broker's redacted URI:
/// AMQP cannot list queues, so this is how the next process finds the
/// ones a killed process left. Per user, in the temporary directory.
fn notes_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let user = std::fs::metadata("/proc/self")
        .map(|m| format!("-{}", m.uid()))
        .unwrap_or_default();
    std::env::temp_dir().join(format!("commissaire-host-replies{user}"))
}

/// The note of one declared reply queue; removed once the queue is gone.
#[derive(Debug)]
pub struct Note(PathBuf);

impl Note {
    /// Notes that `name` is declared on `broker`. `None` (and a warning)
    /// if it cannot be written: the queue then stays behind if this
    /// process is killed.
    pub fn write(name: &ReplyName, broker: &str) -> Option<Self> {
        let dir = notes_dir();
        let path = dir.join(name.as_str());
        let written =
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, broker.as_bytes()));
        match written {
            Ok(()) => Some(Self(path)),
            Err(e) => {
                tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "cannot note the reply queue; if this process is killed, the queue stays on the broker"
                );
                None
            }
        }
    }

    /// The queue is deleted: forgets it.
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::debug!(file = %self.0.display(), error = %e, "cannot remove a reply queue note");
        }
    }
}

/// The noted reply queues on `broker` that are abandoned, with their notes.
pub fn abandoned_notes(broker: &str) -> Vec<(String, Note)> {
    let Ok(entries) = std::fs::read_dir(notes_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            if !is_abandoned(&name) {
                return None;
            }
            let noted = std::fs::read_to_string(entry.path()).ok()?;
            (noted == broker).then(|| (name, Note(entry.path())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_host_and_pid() {
        let name = ReplyName::new();
        let rest = name
            .as_str()
            .strip_prefix(&local_prefix())
            .expect("this machine's prefix");
        let (pid, tag) = rest.split_once('-').expect("pid-tag");
        assert_eq!(pid, std::process::id().to_string());
        assert_eq!(tag.len(), 8);
        assert!(name.as_str().len() < 255, "an AMQP short string");
    }

    #[test]
    fn only_names_nobody_uses_are_abandoned() {
        let name = ReplyName::new();
        assert!(!is_abandoned(name.as_str()), "in use by this process");
        let text = name.as_str().to_owned();
        drop(name);
        assert!(is_abandoned(&text), "this process no longer uses it");

        // A pid that runs (this test's parent, at least 1) and one that
        // cannot (beyond Linux's pid_max).
        let parent = std::os::unix::process::parent_id();
        assert!(!is_abandoned(&format!(
            "{}{parent}-0123abcd",
            local_prefix()
        )));
        assert!(is_abandoned(&format!("{}4194305-0123abcd", local_prefix())));
    }

    #[test]
    fn other_names_are_never_abandoned() {
        let dead = 4_194_305;
        for name in [
            format!("{PREFIX}another-host-{dead}-0123abcd"),
            format!("{}{dead}-0123abcd-extra", local_prefix()),
            format!("{}{dead}-0123abcz", local_prefix()),
            format!("{}x{dead}-0123abcd", local_prefix()),
            format!("{}{dead}", local_prefix()),
            "response-0123".to_owned(),
            "simple".to_owned(),
        ] {
            assert!(!is_abandoned(&name), "{name}");
        }
    }

    #[test]
    fn notes_of_abandoned_queues_on_the_same_broker() {
        let broker = format!("amqp://test-{}/", uuid::Uuid::new_v4());
        let name = ReplyName::new();
        let note = Note::write(&name, &broker).expect("note written");
        assert!(abandoned_notes(&broker).is_empty(), "in use");
        let text = name.as_str().to_owned();
        drop(name);
        let found = abandoned_notes(&broker);
        assert_eq!(
            found.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            [text.as_str()]
        );
        assert!(abandoned_notes("amqp://another-broker/").is_empty());
        note.remove();
        assert!(abandoned_notes(&broker).is_empty());
    }
}
