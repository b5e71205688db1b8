//! The plugin loader against real libraries: our plugins, garbage, and the
//! ABI fixtures built against frozen copies of older and newer plugin-api
//! releases.

use commissaire_e2e::{host_1_1_bin, library, load, plugin_dir, RoutingBus};
use commissaire_host::plugin::{LoadErrorKind, PluginLibrary, PluginSet};
use serde_json::json;

fn refusal(lib_name: &str) -> String {
    match PluginLibrary::load(&library(lib_name)) {
        Ok(p) => panic!("{lib_name} loaded as service {}", p.service_name),
        Err(e) => e.to_string(),
    }
}

#[test]
fn our_plugins_load_with_their_methods() {
    let simple = load("simple");
    assert_eq!(simple.service_name, "simple");
    assert_eq!(simple.api_version, "1.6.0");
    assert!(
        simple.contract.is_some(),
        "a 1.6 plugin carries its contract"
    );
    let add = simple
        .methods
        .iter()
        .find(|m| m.name == "add")
        .expect("add");
    assert_eq!(add.signature(), "add(x: i64, y: i64) -> i64");
    assert_eq!(add.doc, "Adds two integers.");
    let demo = load("demo");
    let greet = demo
        .methods
        .iter()
        .find(|m| m.name == "greet")
        .expect("greet");
    assert!(greet.params[0].optional);
}

#[test]
fn a_library_that_is_not_a_plugin_is_refused() {
    let line = refusal("commissaire_plugin_api_macros");
    assert!(
        line.ends_with("not a commissaire plugin: no root module"),
        "{line}"
    );
}

#[test]
fn a_garbage_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libgarbage.so");
    std::fs::write(&path, b"this is not an ELF file at all").unwrap();
    let e = PluginLibrary::load(&path).unwrap_err();
    assert!(matches!(e.kind, LoadErrorKind::NotALibrary(_)), "{e}");
    let line = e.to_string();
    assert!(
        line.contains("libgarbage.so") && line.contains("not a loadable library"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1);
}

#[test]
fn a_panic_abort_plugin_is_refused() {
    let line = refusal("fixture_panic_abort");
    assert!(line.contains("built with panic=abort"), "{line}");
}

#[test]
fn another_major_version_is_refused() {
    let line = refusal("fixture_major2");
    assert!(
        line.ends_with("built against plugin-api 2.0, this host speaks 1.x"),
        "{line}"
    );
}

#[test]
fn a_mistyped_host_interface_is_refused_naming_the_field() {
    let line = refusal("fixture_mistyped");
    assert!(
        line.ends_with("host interface mismatch: field `request` has another type"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1);
}

#[test]
fn an_older_plugin_loads_and_works_in_this_host() {
    let older = load("fixture_older");
    assert_eq!(older.api_version, "1.0.0");
    assert_eq!(older.description, None, "1.0 had no description entry");
    assert_eq!(older.contract, None, "1.0 had no contract entry");
    let bus = RoutingBus::serving(&["fixture_older", "simple"]);
    assert_eq!(
        bus.call("older.ping", json!([]))["result"],
        "pong from older"
    );
    assert_eq!(
        bus.call("older.whoami", json!([]))["result"],
        "older.whoami"
    );
    // Its view of the host's `request` callback still works.
    assert_eq!(bus.call("older.ask", json!([]))["result"], 5);
}

#[test]
fn a_1_1_plugin_built_with_its_own_macro_loads_and_works_in_this_host() {
    let classic = load("fixture_v1_1");
    assert_eq!(classic.api_version, "1.1.0");
    assert_eq!(
        classic.description.as_deref(),
        Some("A plugin-api 1.1 plugin.")
    );
    let ask = classic
        .methods
        .iter()
        .find(|m| m.name == "ask")
        .expect("ask");
    assert_eq!(ask.signature(), "ask(x: i64, y: i64) -> i64");
    let bus = RoutingBus::serving(&["fixture_v1_1", "simple"]);
    assert_eq!(
        bus.call("classic.ping", json!([]))["result"],
        "pong from classic"
    );
    // 1.1's `request` sends a zero timeout for "the host's default".
    assert_eq!(bus.call("classic.ask", json!([2, 3]))["result"], 5);
    assert_eq!(
        bus.call("classic.exchange", json!([]))["result"],
        "commissaire"
    );
    assert_eq!(
        bus.call("classic.log", json!(["hi"]))["result"],
        json!(null)
    );
    let reply = bus.call("classic.panic", json!([]));
    assert_eq!(reply["error"]["code"], -32603, "{reply}");
    assert_eq!(
        bus.call("classic.ping", json!([]))["result"],
        "pong from classic"
    );
}

/// Runs `method` of the plugin `lib_name` in the plugin-api 1.1 fixture
/// host: (its reply, what it logged).
fn in_1_1_host(lib_name: &str, method: &str, params: &str) -> (serde_json::Value, String) {
    let out = std::process::Command::new(host_1_1_bin())
        .arg(library(lib_name))
        .args([method, params])
        .output()
        .expect("run the 1.1 host");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let reply = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (reply, stderr)
}

#[test]
fn this_versions_plugins_work_in_a_1_1_host() {
    let (reply, log) = in_1_1_host("simple", "wordy_add", "[1, 2]");
    assert_eq!(reply["result"], "Adding 1 plus 2 results in 3", "{log}");
    // `Bus::request` asks for the host's default timeout as 1.1 knew it.
    assert!(log.contains("request simple.add timeout=None"), "{log}");
    let (reply, log) = in_1_1_host("demo", "chatter", r#"["old"]"#);
    assert_eq!(reply["result"], "logged", "{log}");
    // The 1.1 host gave no logger: `tracing` stays in the plugin, while
    // `Message::log_info` still reaches the host.
    assert!(
        log.contains("log level=3 method=chatter: log_info: old"),
        "{log}"
    );
    assert!(!log.contains("words=old"), "{log}");
    let (reply, _) = in_1_1_host("demo", "parse", r#"["[1"]"#);
    assert_eq!(reply["error"]["code"], -32603, "{reply}");
    // `publish` came with 1.4: refused in words, nothing crashes.
    let (reply, log) = in_1_1_host("demo", "announce", r#"["notify.demo.x", "{}"]"#);
    assert_eq!(reply["error"]["code"], -32000, "{log}");
    assert_eq!(
        reply["error"]["message"],
        "this host does not support `publish`; it needs a newer commissaire-host"
    );
}

#[test]
fn a_newer_plugin_loads_and_uses_what_this_host_has() {
    let newer = load("fixture_newer");
    assert_eq!(newer.api_version, "1.7.0");
    let bus = RoutingBus::serving(&["fixture_newer", "simple"]);
    assert_eq!(
        bus.call("newer.ping", json!([]))["result"],
        "pong from newer"
    );
    assert_eq!(bus.call("newer.ask", json!([]))["result"], 5);
    assert_eq!(
        bus.call("newer.exchange", json!([]))["result"],
        "commissaire"
    );
    // Its 1.4 `publish` is this host's: the frozen plugin's call arrives
    // as it made it (the deployment's exchange, `x`, `{}`).
    let reply = bus.call("newer.publish", json!([]));
    assert_eq!(reply["result"], json!(null), "{reply}");
    assert_eq!(
        bus.published(),
        [(String::new(), "x".to_owned(), "{}".to_owned())]
    );
    // It got this host's logger at load (a 1.2 entry it knows too).
    assert_eq!(bus.call("newer.log", json!([]))["result"], json!(null));
}

#[test]
fn a_directory_is_loaded_with_each_refusal_reported() {
    let dir = plugin_dir(&[
        "simple",
        "demo",
        "fixture_older",
        "fixture_newer",
        "fixture_v1_1",
        "fixture_mistyped",
        "fixture_major2",
        "fixture_panic_abort",
    ]);
    std::fs::write(dir.path().join("junk.so"), b"junk").unwrap();
    std::fs::write(
        dir.path().join("README.txt"),
        b"not a library, not even looked at",
    )
    .unwrap();
    std::fs::copy(library("simple"), dir.path().join("libsimple_again.so")).unwrap();

    let set = PluginSet::load_dir(dir.path(), Default::default()).unwrap();
    let mut loaded: Vec<&str> = set
        .plugins
        .iter()
        .map(|p| p.service_name.as_str())
        .collect();
    loaded.sort_unstable();
    assert_eq!(loaded, ["classic", "demo", "newer", "older", "simple"]);
    let mut refused: Vec<String> = set
        .refused
        .iter()
        .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    refused.sort();
    assert_eq!(
        refused,
        [
            "junk.so",
            "libfixture_major2.so",
            "libfixture_mistyped.so",
            "libfixture_panic_abort.so",
            "libsimple_again.so"
        ]
    );
    let dup = set
        .refused
        .iter()
        .find(|e| matches!(e.kind, LoadErrorKind::DuplicateService { .. }))
        .unwrap();
    let line = dup.to_string();
    assert!(
        line.contains("libsimple_again.so") && line.contains("libsimple.so"),
        "{line}"
    );
}

#[test]
fn a_missing_directory_is_one_clear_error() {
    let e = PluginSet::load_dir(
        std::path::Path::new("/nonexistent/plugins"),
        Default::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot read plugin directory /nonexistent/plugins"),
        "{e}"
    );
}
