//! The work directory of slot files and plugin copies, and sweeping the
//! ones that killed supervisors left behind.

use std::path::{Path, PathBuf};

use super::SupervisorError;

/// Sweeps dead supervisors' work directories, then makes ours.
pub(super) fn create() -> Result<PathBuf, SupervisorError> {
    create_in(&slot_dir())
}

/// Sweeps dead supervisors' work directories in `base`, then makes ours
/// there.
pub(super) fn create_in(base: &Path) -> Result<PathBuf, SupervisorError> {
    remove_dead_work_dirs(base);
    // A name nobody can guess ahead, created here and now (never an
    // existing directory or link), readable by us alone: the slot files in
    // it decide which requests are refused, and the plugin copies in it
    // are the code workers run.
    let work_dir = base.join(format!(
        "commissaire-host-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&work_dir)
        .map_err(|source| SupervisorError::WorkDir {
            path: work_dir.clone(),
            source,
        })?;
    Ok(work_dir)
}

/// Where slot files go: `/dev/shm` (memory) where there is one, else the
/// temporary directory. Workers write their slot file twice per request;
/// on a disk file system each write also updates the inode in the journal.
fn slot_dir() -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let writable = std::fs::metadata(shm).is_ok_and(|m| m.is_dir() && !m.permissions().readonly());
    if writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Removes the work directories (`commissaire-host-<pid>`) that
/// supervisors killed without a chance to clean up left in `base`: those
/// whose process is gone.
fn remove_dead_work_dirs(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("commissaire-host-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::debug!(dir = %entry.path().display(), error = %e, "cannot remove a dead supervisor's work directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_dirs_of_dead_supervisors_are_removed_and_live_ones_kept() {
        let base =
            std::env::temp_dir().join(format!("commissaire-sweep-test-{}", std::process::id()));
        let dead = base.join(format!("commissaire-host-{}-0a1b", u32::MAX));
        let live = base.join(format!("commissaire-host-{}-2c3d", std::process::id()));
        let other = base.join("something-else");
        for dir in [&dead, &live, &other] {
            std::fs::create_dir_all(dir).expect("mkdir");
            std::fs::write(dir.join("simple-1.slots"), b"x").expect("write");
        }
        remove_dead_work_dirs(&base);
        assert!(!dead.exists(), "a dead supervisor's directory is removed");
        assert!(live.exists(), "a live supervisor's directory is kept");
        assert!(other.exists(), "other entries are left alone");
        std::fs::remove_dir_all(&base).expect("cleanup");
    }
}
