//! Plugins are trusted as ssh trusts keys (host/src/plugin/trust.rs): the
//! `.so`, its real path after symlinks and every directory on the way from
//! `/` owned by root or the host's user, writable by no one else. Each case
//! lays out a scratch directory of its own in the temporary directory (a
//! sticky `/tmp` may be passed through) and checks that `plugins` and `run`
//! on RabbitMQ refuse it with one line naming the path and why, exit 1, and
//! that `--allow-insecure-plugins` serves it.

use std::os::unix::fs::{chown, symlink, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use commissaire_e2e::host::{HostSpec, TestHost};
use commissaire_e2e::{host_bin, library};
use serde_json::json;

const NOBODY: u32 = 65534;

/// `<scratch>/plugins/libsimple.so`, 0755 and 0644; the scratch
/// directory goes when the test ends.
struct Layout {
    scratch: tempfile::TempDir,
    plugins: PathBuf,
}

impl Layout {
    fn new() -> Self {
        let scratch = tempfile::tempdir().expect("temp dir");
        let plugins = scratch.path().join("plugins");
        std::fs::create_dir(&plugins).expect("mkdir");
        chmod(&plugins, 0o755);
        let lib = plugins.join("libsimple.so");
        std::fs::copy(library("simple"), &lib).expect("copy the plugin");
        chmod(&lib, 0o644);
        Self { scratch, plugins }
    }

    fn lib(&self) -> PathBuf {
        self.plugins.join("libsimple.so")
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Giving files to `nobody` needs root; other users cannot test owners.
fn as_root(layout: &Layout) -> bool {
    let root = std::fs::metadata(layout.scratch.path()).is_ok_and(|m| m.uid() == 0);
    if !root {
        eprintln!("not root: cannot give files to nobody, ownership not tested");
    }
    root
}

fn plugins(dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(host_bin())
        .arg("plugins")
        .arg(dir)
        .args(extra)
        .output()
        .expect("run commissaire-host plugins")
}

/// `<kind> <path> <why>` is what `plugins` and `run` say, on one line, and
/// both exit 1; with `--allow-insecure-plugins` both serve the plugin.
fn refused_then_allowed(layout: &Layout, kind: &str, path: &Path, why: &str) {
    let said = format!("{kind} {} {why}", path.display());

    let out = plugins(&layout.plugins, &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&said)).collect();
    assert_eq!(lines.len(), 1, "`plugins` says `{said}` once:\n{text}");
    assert!(
        lines[0].ends_with("or pass --allow-insecure-plugins"),
        "{}",
        lines[0]
    );
    let out = plugins(&layout.plugins, &["--allow-insecure-plugins"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let spec = HostSpec {
        plugins: vec!["simple"],
        plugins_dir: Some(layout.plugins.clone()),
        ..HostSpec::amqp()
    };
    let mut host = TestHost::start_expecting_failure(spec.clone(), "");
    let status = host.wait(Duration::from_secs(30));
    let log = host.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("commissaire-host: ") && last.contains(&said),
        "`run` ends with one line saying `{said}`:\n{log}"
    );

    let host = TestHost::start(HostSpec {
        args: vec!["--allow-insecure-plugins".to_owned()],
        ..spec
    });
    let (status, reply) = host.http_call("simple.add", &json!({"id": 1, "params": [1, 2]}));
    assert_eq!(
        (status, reply["result"].clone()),
        (200, json!(3)),
        "{reply}"
    );
}

#[test]
fn a_plugin_owned_by_nobody_is_refused() {
    let layout = Layout::new();
    if !as_root(&layout) {
        return;
    }
    chown(layout.lib(), Some(NOBODY), None).expect("chown");
    refused_then_allowed(
        &layout,
        "file",
        &layout.lib(),
        "is owned by nobody (uid 65534), not by root, who runs the host",
    );
}

#[test]
fn a_plugin_directory_owned_by_nobody_is_refused() {
    let layout = Layout::new();
    if !as_root(&layout) {
        return;
    }
    chown(&layout.plugins, Some(NOBODY), None).expect("chown");
    refused_then_allowed(
        &layout,
        "directory",
        &layout.plugins,
        "is owned by nobody (uid 65534), not by root, who runs the host",
    );
}

/// ssh checks every directory up to `/`, not only the last one.
#[test]
fn a_directory_owned_by_nobody_further_up_is_refused() {
    let layout = Layout::new();
    if !as_root(&layout) {
        return;
    }
    chown(layout.scratch.path(), Some(NOBODY), None).expect("chown");
    refused_then_allowed(
        &layout,
        "directory",
        layout.scratch.path(),
        "is owned by nobody (uid 65534), not by root, who runs the host",
    );
}

/// The plugin directory is fine, but its `.so` is a symlink into a 0777
/// directory, where anyone could swap the file.
#[test]
fn a_symlink_into_a_world_writable_directory_is_refused() {
    let layout = Layout::new();
    let open = layout.scratch.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::rename(layout.lib(), open.join("libsimple.so")).expect("move");
    chmod(&open, 0o777);
    symlink("../open/libsimple.so", layout.lib()).expect("symlink");
    refused_then_allowed(
        &layout,
        "directory",
        &open,
        "is writable by group or others (mode 777)",
    );
}

#[test]
fn a_group_writable_parent_directory_is_refused() {
    let layout = Layout::new();
    chmod(layout.scratch.path(), 0o775);
    refused_then_allowed(
        &layout,
        "directory",
        layout.scratch.path(),
        "is writable by group or others (mode 775)",
    );
}
