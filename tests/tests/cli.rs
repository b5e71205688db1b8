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
    // No queue takes it: answered at once, -32601.
    assert_eq!(status, 404, "{reply}");
    assert_eq!(reply["error"]["code"], -32601, "{reply}");
    assert!(reply["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no queue is bound to nobody.home"));
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
        ("[bus]\nuri = 5\n".to_owned(), "host.toml:2:7: invalid type: integer `5`, expected a URI string or a list of URI strings"),
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
    assert!(
        err.trim_end()
            .ends_with("(the bus URI came from --bus-uri)"),
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
    assert!(
        err.contains("(the bus URI came from COMMISSAIRE_BUS_URI)"),
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

/// Runs the binary with the default log filter (whatever the caller's
/// environment says) and at most `limit` to finish.
fn run_default_logs(args: &[&str], limit: std::time::Duration) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(host_bin())
        .args(args)
        .env_remove("COMMISSAIRE_LOG")
        .env_remove("RUST_LOG")
        .env_remove("COMMISSAIRE_BUS_URI")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("run commissaire-host");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    let Some(status) = status else {
        panic!("still running after {limit:?}:\n{err}");
    };
    (status.code(), err)
}

#[test]
fn call_with_a_wrong_password_is_one_line_from_the_host() {
    let (code, err) = run_default_logs(
        &[
            "call",
            "simple.add",
            "[1,2]",
            "--bus-uri",
            "amqp://guest:not-the-password@127.0.0.1:5672/%2f",
        ],
        std::time::Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("commissaire-host: cannot connect to amqp://guest:***@127.0.0.1:5672/%2f: ACCESS_REFUSED"),
        "{err}"
    );
    assert!(
        err.trim_end()
            .ends_with("(the bus URI came from --bus-uri)"),
        "{err}"
    );
    assert!(!err.contains("not-the-password"), "{err}");
}

#[test]
fn run_ends_on_a_refused_login_or_vhost_instead_of_retrying_forever() {
    let plugins = plugin_dir(&["simple"]);
    let dir = plugins.path().to_str().expect("UTF-8 temp path");
    for (uri, said) in [
        (
            "amqp://guest:not-the-password@127.0.0.1:5672/%2f",
            "ACCESS_REFUSED",
        ),
        (
            "amqp://guest:guest@127.0.0.1:5672/commissaire-no-such-vhost",
            "NOT_ALLOWED",
        ),
        (
            "redis://127.0.0.1:6379/9999",
            "Redis server refused to switch database",
        ),
    ] {
        let (code, err) = run_default_logs(
            &["run", "--plugins-dir", dir, "--bus-uri", uri],
            std::time::Duration::from_secs(60),
        );
        assert_eq!(code, Some(1), "{uri}: {err}");
        assert_eq!(err.lines().count(), 1, "{uri}: {err}");
        assert!(err.contains(said), "{uri}: {err}");
        assert!(
            err.contains(
                "(the bus URI came from --bus-uri; tried 3 times, retrying cannot fix this)"
            ),
            "{uri}: {err}"
        );
        assert!(!err.contains("not-the-password"), "{err}");
    }
}

#[test]
fn a_missing_plugin_directory_says_the_os_error_once() {
    for bus in ["memory://", "amqp://guest:guest@127.0.0.1:1/%2f"] {
        let (code, err) = run_default_logs(
            &[
                "run",
                "--plugins-dir",
                "/nonexistent/plugins",
                "--bus-uri",
                bus,
            ],
            std::time::Duration::from_secs(60),
        );
        assert_eq!(code, Some(1), "{bus}: {err}");
        assert_eq!(
            err,
            "commissaire-host: cannot read plugin directory /nonexistent/plugins: \
             No such file or directory (os error 2)\n",
            "{bus}"
        );
    }
}

#[test]
fn an_empty_plugin_directory_says_how_to_give_one() {
    let empty = tempfile::tempdir().expect("temp dir");
    let dir = empty.path().to_str().expect("UTF-8 temp path");
    for bus in ["memory://", "amqp://guest:guest@127.0.0.1:1/%2f"] {
        let (code, err) = run_default_logs(
            &["run", "--plugins-dir", dir, "--bus-uri", bus, "--fail-fast"],
            std::time::Duration::from_secs(60),
        );
        assert_eq!(code, Some(1), "{bus}: {err}");
        assert_eq!(err.lines().count(), 1, "{bus}: {err}");
        assert!(
            err.contains(&format!("the plugin directory {dir} holds no .so file")),
            "{err}"
        );
        assert!(err.contains("--plugins-dir"), "{err}");
        assert!(err.contains("-c examples/host.toml"), "{err}");
    }
}

#[test]
fn the_embedded_bus_without_http_says_nothing_can_reach_it() {
    let plugins = plugin_dir(&["simple"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(host_bin())
        .args(["run", "--bus-uri", "memory://", "--plugins-dir"])
        .arg(plugins.path())
        .env_remove("COMMISSAIRE_LOG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("run commissaire-host");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = std::time::Instant::now();
    while !read().contains("without an HTTP endpoint") {
        if started.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no warning after 30 s:\n{}", read());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    let text = read();
    assert!(status.success(), "{status}: {text}");
    assert!(text.contains("ready service=simple"), "{text}");
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("without an HTTP endpoint: nothing outside this process can reach it"),
        "{text}"
    );
    assert!(warnings[0].contains("--http-listen"), "{text}");
}

/// Flag, then environment, then file: each row of the README's table, as
/// `call` sees it (each candidate URI names a port nothing listens on, so
/// the error says which one was used, and where it came from).
#[test]
fn settings_come_from_the_flag_then_the_environment_then_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        "[bus]\nuri = \"amqp://guest:guest@127.0.0.1:3/file\"\n[http]\ntoken = \"from-the-file\"\n",
    )
    .expect("write config");
    let config = config.to_str().expect("UTF-8 temp path");
    let call = |flag: Option<&str>, env: &[(&str, &str)], with_file: bool| {
        let mut command = Command::new(host_bin());
        command.args(["call", "simple.add", "[1,2]", "--timeout", "5"]);
        if with_file {
            command.args(["--config", config]);
        }
        if let Some(uri) = flag {
            command.args(["--bus-uri", uri]);
        }
        command
            .env_remove("COMMISSAIRE_BUS_URI")
            .env_remove("COMMISSAIRE_HTTP_TOKEN")
            .env("COMMISSAIRE_LOG", "warn");
        for (name, value) in env {
            command.env(name, value);
        }
        let out = command.output().expect("run commissaire-host");
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).replace(config, "host.toml")
    };
    let flag = Some("amqp://guest:guest@127.0.0.1:1/flag");
    let env = [("COMMISSAIRE_BUS_URI", "amqp://guest:guest@127.0.0.1:2/env")];
    let env_and_token = [env[0], ("COMMISSAIRE_HTTP_TOKEN", "from-the-environment")];
    let rows: [(&str, String, &[&str]); 5] = [
        (
            "flag, environment and file",
            call(flag, &env, true),
            &[
                "127.0.0.1:1/flag",
                "(the bus URI came from --bus-uri)",
                "WARN",
                "COMMISSAIRE_BUS_URI is set, but --bus-uri wins over it",
            ],
        ),
        (
            "environment and file",
            call(None, &env_and_token, true),
            &[
                "127.0.0.1:2/env",
                "(the bus URI came from COMMISSAIRE_BUS_URI)",
                "host.toml: [bus] uri is not used: COMMISSAIRE_BUS_URI is set and wins over it",
                "host.toml: [http] token is not used: COMMISSAIRE_HTTP_TOKEN is set and wins over it",
            ],
        ),
        (
            "file alone",
            call(None, &[], true),
            &["127.0.0.1:3/file", "(the bus URI came from host.toml: [bus] uri)"],
        ),
        (
            "flag over a file, as flags are for",
            call(flag, &[], true),
            &["127.0.0.1:1/flag", "(the bus URI came from --bus-uri)"],
        ),
        (
            "nothing: the embedded bus",
            call(None, &[], false),
            &["memory:// is the embedded bus of one host process"],
        ),
    ];
    for (row, err, says) in rows {
        for said in says {
            assert!(err.contains(said), "{row}: no `{said}` in\n{err}");
        }
        let warnings = err.lines().filter(|l| l.contains("WARN")).count();
        let expected = says
            .iter()
            .filter(|s| s.contains("not used") || s.contains("wins over it"))
            .count();
        assert_eq!(
            warnings, expected,
            "{row}: one warning per hidden setting\n{err}"
        );
        assert!(
            !err.contains("from-the-"),
            "{row}: a token in the output\n{err}"
        );
    }
}

/// A port already taken ends `run` before any service says it is ready,
/// with the OS's words once.
#[test]
fn an_http_port_in_use_is_said_once_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let plugins = plugin_dir(&["simple"]);
    let dir = plugins.path().to_str().expect("UTF-8 temp path");
    let (code, err) = run_default_logs(
        &["run", "--plugins-dir", dir, "--http-listen", &addr],
        std::time::Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr}: Address already in use")),
        "{err}"
    );
    assert!(
        !err.contains(": ready"),
        "a service said ready first: {err}"
    );
}

/// A plugin whose `init` refuses its `config` table: the error names the
/// `[[service]]` entry, the plugin file and the plugin's own words.
#[test]
fn a_failing_init_names_the_service_entry_and_the_plugin_file() {
    let plugins = plugin_dir(&["demo"]);
    let text = format!(
        "[plugins]\ndir = \"{}\"\n\n[[service]]\nname = \"demo\"\nconfig = {{ greeting = 3 }}\n",
        plugins.path().display()
    );
    let (code, err) = run_with_config(&text, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "commissaire-host: host.toml:5:8: service `demo` (libdemo.so) failed to start: "
        ),
        "{err}"
    );
    assert!(err.contains("`greeting` must be a string, not 3"), "{err}");
}

/// `call` to an exchange no service declared (no host running, or another
/// `[bus] exchange`): said in those words, not as a lost connection.
#[test]
fn a_call_to_an_exchange_nobody_declared_says_so() {
    let exchange = format!("cli-no-exchange-{}", uuid::Uuid::new_v4().simple());
    let (code, err) = run_default_logs(
        &[
            "call",
            "simple.add",
            "[1,2]",
            "--bus-uri",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "--bus-exchange",
            &exchange,
        ],
        std::time::Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.ends_with(&format!(
            "commissaire-host: no exchange `{exchange}` on this broker: no service has declared \
             it (is a host serving here with the same [bus] exchange, or --bus-exchange?)\n"
        )),
        "{err}"
    );
}
