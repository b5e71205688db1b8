//! The binary on the embedded bus, and its failures: bad configs, an
//! unreachable broker.

use std::process::Command;

use commissaire_e2e::host::{HostSpec, TestHost};
use commissaire_e2e::{host_bin, plugin_dir};
use serde_json::json;

#[test]
fn memory_bus_serves_http_calls_including_handler_to_handler() {
    let host = TestHost::start(HostSpec::memory());
    let (status, reply) = host.http_call("simple.add", &json!({"id": 1, "params": [1, 2]}));
    assert_eq!(
        (status, reply),
        (200, json!({"jsonrpc": "2.0", "id": 1, "result": 3}))
    );
    let (_, reply) = host.http_call("simple.wordy_add", &json!({"id": 2, "params": [1, 2]}));
    assert_eq!(reply["result"], "Adding 1 plus 2 results in 3");
    let (_, reply) = host.http_call("demo.greet", &json!({"id": 3, "params": {}}));
    assert_eq!(reply["result"], "hello, world!");
    let (status, reply) = host.http_call("demo.nope", &json!({"id": 4}));
    assert_eq!(
        (status, reply["error"]["code"].clone()),
        (200, json!(-32601))
    );
    let (status, _) = host.http_call("demo.ping", &json!({}));
    assert_eq!(status, 202);
    let (status, reply) = commissaire_e2e::host::http_post(
        host.http,
        "/rpc/nobody.home?timeout=0.5",
        &json!({"id": 5}),
    )
    .unwrap();
    assert_eq!(status, 504, "{reply}");
    assert!(reply["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no reply from `nobody.home`"));
}

#[test]
fn call_and_notify_refuse_the_memory_bus_with_a_hint() {
    for cmd in ["call", "notify"] {
        let out = Command::new(host_bin())
            .args([cmd, "simple.add", "[1,2]", "--bus-uri", "memory://"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("memory:// is the embedded bus of one host process"),
            "{err}"
        );
        assert!(err.contains("/rpc/simple.add"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn sigterm_on_the_memory_bus_exits_zero() {
    let mut host = TestHost::start(HostSpec::memory());
    host.signal("TERM");
    let status = host.wait(std::time::Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", host.stderr());
}

fn run_with_config(text: &str, extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("host.toml");
    std::fs::write(&config, text).expect("write config");
    let out = Command::new(host_bin())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(extra)
        .env("COMMISSAIRE_LOG", "error")
        .output()
        .expect("run commissaire-host");
    let err =
        String::from_utf8_lossy(&out.stderr).replace(&config.display().to_string(), "host.toml");
    (out.status.code(), err)
}

#[test]
fn bad_config_files_are_one_line_with_file_and_line() {
    let plugins = plugin_dir(&["simple"]);
    let dir = plugins.path().display().to_string();
    let cases = [
        ("[bus]\nuri = 5\n".to_owned(), "host.toml:2:7: invalid type: integer `5`, expected a string"),
        ("[buss]\n".to_owned(), "host.toml:1:2: unknown field `buss`"),
        (format!("[plugins]\ndir = \"{dir}\"\n[http]\nlisten = \"x\"\n"), "host.toml:4:10: invalid socket address syntax"),
        (
            format!("[plugins]\ndir = \"{dir}\"\n[[service]]\nname = \"nope\"\n"),
            "host.toml:4:8: [[service]] `nope` is not exported by any loaded plugin (loaded: simple)",
        ),
        ("[plugins]\ndir = \"/nonexistent/plugins\"\n".to_owned(), "cannot read plugin directory /nonexistent/plugins"),
    ];
    for (text, expected) in cases {
        let (code, err) = run_with_config(&text, &[]);
        assert_eq!(code, Some(1), "{text}: {err}");
        assert_eq!(err.lines().count(), 1, "{text}: {err}");
        assert!(
            err.starts_with(&format!("commissaire-host: {expected}")),
            "{text}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn unreachable_broker_is_a_clear_error_without_the_password() {
    let plugins = plugin_dir(&["simple"]);
    let text = format!("[plugins]\ndir = \"{}\"\n", plugins.path().display());
    let (code, err) = run_with_config(
        &text,
        &[
            "--bus-uri",
            "amqp://guest:hunter2@127.0.0.1:1/%2f",
            "--fail-fast",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("commissaire-host: cannot connect to amqp://guest:***@127.0.0.1:1/%2f"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bus_uri_from_the_environment_when_no_flag_or_file_gives_one() {
    let plugins = plugin_dir(&["simple"]);
    let out = Command::new(host_bin())
        .args(["run", "--fail-fast", "--plugins-dir"])
        .arg(plugins.path())
        .env(
            "COMMISSAIRE_BUS_URI",
            "amqp://guest:hunter2@127.0.0.1:1/%2f",
        )
        .env("COMMISSAIRE_LOG", "error")
        .output()
        .expect("run commissaire-host");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to amqp://guest:***@127.0.0.1:1/%2f"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn without_fail_fast_an_unreachable_broker_is_retried_until_stopped() {
    let plugins = plugin_dir(&["simple"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("stderr.log");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Command::new(host_bin())
        .args(["run", "--plugins-dir"])
        .arg(plugins.path())
        .args(["--bus-uri", "amqp://guest:hunter2@127.0.0.1:1/%2f"])
        .env("COMMISSAIRE_LOG", "warn")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run commissaire-host");
    let mut child = KillOnDrop(child);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = std::time::Instant::now();
    while read().matches("retrying").count() < 3 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no retries logged:\n{}",
            read()
        );
        assert!(
            child.0.try_wait().expect("wait").is_none(),
            "exited:\n{}",
            read()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let text = read();
    assert!(text.contains("attempt=3"), "{text}");
    assert!(text.contains("amqp://guest:***@127.0.0.1:1/%2f"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "SIGTERM while waiting exits 0: {status}");
}
