//! Deploying in place of an original Commissaire service: its JSON config
//! file (`/etc/commissaire/<service>.conf`) read as it is, by `run` and by
//! `call`. On Redis database 12, this file's own.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use commissaire_e2e::host::{cleanup_redis, redis_keys, redis_uri, unique};
use commissaire_e2e::{host_bin, plugin_dir};
use serde_json::json;

/// The original's `storage.conf`, in shape (its keys, our values), for the
/// demo plugin: `greeting` is the plugin's own key, like
/// `storage_handlers`; `debug` asks for debug logs.
fn original_conf(uri: &str, exchange: &str) -> String {
    json!({
        "bus_uri": uri,
        "exchange_name": exchange,
        "debug": true,
        "greeting": "Hej",
        "custodia_socket_path": "/var/run/custodia/custodia.sock",
        "storage_handlers": [
            {"type": "etcd", "server_url": "http://127.0.0.1:2379", "certificate_path": null,
             "models": ["*"]}
        ]
    })
    .to_string()
}

#[test]
fn an_original_json_config_serves_its_service_with_its_keys() {
    let uri = redis_uri(12, "");
    let before = redis_keys(&uri);
    let exchange = unique("orig-ex");
    let dir = tempfile::tempdir().expect("temp dir");
    // Named after its service, as /etc/commissaire/storage.conf is.
    let conf = dir.path().join("demo.conf");
    std::fs::write(&conf, original_conf(&uri, &exchange)).expect("write demo.conf");
    let plugins = plugin_dir(&["demo"]);
    let stderr_path = dir.path().join("stderr.log");
    let mut host = Command::new(host_bin())
        .args(["run", "--config-file"])
        .arg(&conf)
        .arg("--plugins-dir")
        .arg(plugins.path())
        .env_remove("COMMISSAIRE_LOG")
        .env_remove("RUST_LOG")
        .env_remove("COMMISSAIRE_BUS_URI")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("run the host");
    let log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    // `call` reads the same file for its bus: the reply says the greeting
    // reached the plugin's init.
    let started = Instant::now();
    let reply = loop {
        let out = Command::new(host_bin())
            .args(["call", "demo.greet", r#"["world"]"#, "--config-file"])
            .arg(&conf)
            .env_remove("COMMISSAIRE_BUS_URI")
            .output()
            .expect("call");
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no answer: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(reply, r#""Hej, world!""#, "{}", log());
    let text = log();
    assert!(
        text.contains("DEBUG"),
        "`debug: true` gives debug logs:\n{text}"
    );
    // The bus is `bus_uri`'s database, the exchange `exchange_name`.
    let binding = format!("_kombu.binding.{exchange}");
    assert!(redis_keys(&uri).contains(&binding), "no {binding}:\n{text}");

    let _ = Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    let started = Instant::now();
    while host.try_wait().ok().flatten().is_none() {
        if started.elapsed() > Duration::from_secs(40) {
            let _ = host.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = host.wait();
    cleanup_redis(&uri, &exchange, &["demo".to_owned()]);
    let left: Vec<String> = redis_keys(&uri).difference(&before).cloned().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
