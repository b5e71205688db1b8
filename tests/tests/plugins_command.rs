//! `commissaire-host plugins DIR`, the real binary.

use std::process::Command;

use commissaire_e2e::{host_bin, plugin_dir};

#[test]
fn lists_services_versions_methods_and_first_doc_lines() {
    let dir = plugin_dir(&["simple", "demo"]);
    let out = Command::new(host_bin())
        .arg("plugins")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("libsimple.so\n  service simple 0.1.0 (plugin-api 1.5.0)\n"),
        "{text}"
    );
    // Signatures in one column, their first doc sentence in the next.
    let add = text
        .lines()
        .find(|l| l.starts_with("    add(x: i64, y: i64) -> i64  "))
        .unwrap_or_else(|| panic!("no add line: {text}"));
    assert!(add.ends_with("  Adds two integers."), "{text}");
    // Async handlers are marked.
    assert!(
        text.contains("    async async_add(x: i64, y: i64) -> i64  "),
        "{text}"
    );
    assert!(
        text.contains("    async nap(ms: u64) -> String  "),
        "{text}"
    );
    assert!(
        text.contains("wordy_add(x: i64, y: i64) -> String"),
        "{text}"
    );
    assert!(
        text.contains("greet(name: Option<String>) -> String"),
        "{text}"
    );
    assert!(text.contains("ping() -> String"), "{text}");
    // A doc comment wrapped over three lines: its first sentence, whole.
    assert!(
        text.contains(
            "Aborts the whole process, as a segfault in native code would: on a broker only \
             this worker dies, its requests go to another worker, and after `crash_limit` \
             crashes the request is refused with -32603.\n"
        ),
        "{text}"
    );
    assert!(text.contains("Answers \"pong\".\n"), "{text}");
}

#[test]
fn refused_plugins_are_listed_with_their_reason_and_exit_non_zero() {
    let dir = plugin_dir(&["simple", "fixture_major2"]);
    let out = Command::new(host_bin())
        .arg("plugins")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(
            "libfixture_major2.so\n  refused: built against plugin-api 2.0, this host speaks 1.x\n"
        ),
        "{text}"
    );
    assert!(text.contains("service simple"), "{text}");
}

#[test]
fn json_output_for_scripts() {
    let dir = plugin_dir(&["simple"]);
    let out = Command::new(host_bin())
        .args(["plugins", "--json"])
        .arg(dir.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plugins"][0]["service"], "simple");
    assert_eq!(v["plugins"][0]["methods"][0]["params"][1]["name"], "y");
}

#[test]
fn a_missing_directory_is_one_line_and_non_zero() {
    let out = Command::new(host_bin())
        .args(["plugins", "/nonexistent/dir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err,
        "commissaire-host: cannot read plugin directory /nonexistent/dir: \
         No such file or directory (os error 2)\n"
    );
}

/// As ssh does with keys: a plugin file or directory that group or others
/// may write is refused, with one line saying so, unless
/// `--allow-insecure-plugins` (owners and symlinks: tests/plugin_trust.rs).
#[test]
fn plugins_writable_by_others_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = plugin_dir(&["simple"]);
    let lib = dir.path().join("libsimple.so");
    let plugins = |extra: &[&str]| {
        Command::new(host_bin())
            .arg("plugins")
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap()
    };
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = plugins(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains(&format!(
            "refused: file {} is writable by group or others (mode 666)",
            lib.display()
        )),
        "{text}"
    );
    assert!(plugins(&["--allow-insecure-plugins"]).status.success());

    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = plugins(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("is writable by group or others (mode 777)"),
        "{stderr}"
    );
    assert!(plugins(&["--allow-insecure-plugins"]).status.success());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
}
