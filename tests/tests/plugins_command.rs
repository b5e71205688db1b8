//! `commissaire-host plugins DIR`, `plugins DIR --openrpc` and `plugins
//! --diff OLD NEW`, the real binary.

use std::path::Path;
use std::process::{Command, Output};

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
        text.contains("libsimple.so\n  service simple 0.1.0 (plugin-api 1.6.0)\n"),
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

#[test]
fn plugins_without_a_contract_are_marked() {
    let dir = plugin_dir(&["simple", "fixture_older"]);
    let out = Command::new(host_bin())
        .arg("plugins")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("  service older 0.9.0 (plugin-api 1.0.0) (no contract)\n"),
        "{text}"
    );
    assert!(
        text.contains("  service simple 0.1.0 (plugin-api 1.6.0)\n"),
        "{text}"
    );

    let out = Command::new(host_bin())
        .args(["plugins", "--json"])
        .arg(dir.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let contracts: Vec<(&str, bool)> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["service"].as_str().unwrap(), p["contract"] == true))
        .collect();
    assert_eq!(contracts, [("older", false), ("simple", true)]);
    // What the supervisor reads back parses, also from a host before
    // contracts (no `contract` member).
    let listing: commissaire_host::listing::Listing = serde_json::from_value(v.clone()).unwrap();
    assert!(listing.plugins[1].contract);
    let mut older = v;
    for p in older["plugins"].as_array_mut().unwrap() {
        p.as_object_mut().unwrap().remove("contract");
    }
    let listing: commissaire_host::listing::Listing = serde_json::from_value(older).unwrap();
    assert!(!listing.plugins[1].contract);
}

#[test]
fn openrpc_prints_each_services_document() {
    let dir = plugin_dir(&["simple", "fixture_older"]);
    let out = Command::new(host_bin())
        .args(["plugins", "--openrpc"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(services, ["older", "simple"]);
    let simple = &v["simple"];
    assert_eq!(simple["openrpc"], "1.3.2");
    assert_eq!(simple["info"]["title"], "simple");
    let add = simple["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "add")
        .unwrap();
    assert_eq!(add["params"][1]["name"], "y");
    assert_eq!(add["params"][1]["schema"]["type"], "integer");
    assert_eq!(add["result"]["schema"]["type"], "integer");
    assert_eq!(add["summary"], "Adds two integers.");
    assert!(simple.get("x-derived").is_none());
    // Built before contracts: one derived from its method list.
    assert_eq!(v["older"]["x-derived"], true);
    assert_eq!(v["older"]["methods"][0]["name"], "ping");
}

fn diff(old: &Path, new: &Path, extra: &[&str]) -> Output {
    Command::new(host_bin())
        .args(["plugins", "--diff"])
        .arg(old)
        .arg(new)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the host: {e}"))
}

#[test]
fn a_diff_without_differences_is_compatible_and_exits_0() {
    let (a, b) = (plugin_dir(&["simple"]), plugin_dir(&["simple"]));
    let out = diff(
        &a.path().join("libsimple.so"),
        &b.path().join("libsimple.so"),
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "compatible: no differences (simple 0.1.0 → 0.1.0)\n"
    );

    // Plugins built before contracts: names and params only, and said so.
    let dir = plugin_dir(&["fixture_older", "fixture_older_next"]);
    let out = diff(
        &dir.path().join("libfixture_older.so"),
        &dir.path().join("libfixture_older_next.so"),
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "compatible: no differences (older 0.9.0 → 0.10.0)\n\
         note: neither has a contract of its own: only method names, params' positions and \
         which are required were compared\n"
    );
}

#[test]
fn a_breaking_diff_names_each_difference_and_exits_1() {
    let dir = plugin_dir(&["simple", "demo"]);
    let (old, new) = (
        dir.path().join("libsimple.so"),
        dir.path().join("libdemo.so"),
    );
    let out = diff(&old, &new, &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Aligned columns: verdict, method, detail.
    let column = lines[0].find("service `simple` is now `demo`").unwrap();
    assert!(lines[0].starts_with("BREAKING  (service) "), "{text}");
    let removed = lines
        .iter()
        .find(|l| l.starts_with("BREAKING  add "))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(&removed[column..], "removed");
    let added = lines
        .iter()
        .find(|l| l.starts_with("ok        ping "))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(&added[column..], "added");
    let verdict = lines.last().unwrap();
    assert!(verdict.starts_with("breaking: "), "{text}");
    assert!(verdict.ends_with(" (simple 0.1.0 → demo 0.1.0)"), "{text}");

    let out = diff(&old, &new, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "breaking");
    assert_eq!(v["old"]["service"], "simple");
    assert_eq!(v["new"]["contract"], true);
    let add = v["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["method"] == "add")
        .unwrap();
    assert_eq!(
        add,
        &serde_json::json!({"method": "add", "change": "method_removed", "breaking": true,
            "detail": "removed"})
    );
}

#[test]
fn a_diff_that_cannot_load_a_file_exits_2() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = plugin_dir(&["simple"]);
    let lib = dir.path().join("libsimple.so");
    let out = diff(&lib, &dir.path().join("libnone.so"), &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("libnone.so"), "{err}");

    // The same trust rules as `plugins DIR`.
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = diff(&lib, &lib, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("is writable by group or others (mode 666)"),
        "{err}"
    );
    let out = diff(&lib, &lib, &["--allow-insecure-plugins"]);
    assert_eq!(out.status.code(), Some(0));
}
