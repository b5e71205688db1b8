//! A host's life as the README's "Reliability" and "Configuration"
//! sections tell it, on the real binary and RabbitMQ: `run` exits 1 for
//! two plugins exporting one service or a failing `init`; `SIGTERM` with a
//! handler that outlives `shutdown_timeout` hands its request back;
//! `SIGHUP` starts a new plugin's workers and stops a removed one's (one
//! without a `[[service]]` entry: removing a configured one is refused);
//! a roll to a plugin whose contract breaks callers is refused while the
//! old version serves on, and a compatible one rolls; workers never see the HTTP token nor carry the bus URI on their
//! command line.

use std::path::Path;
use std::time::Duration;

use commissaire_e2e::host::{amqp_uri, HostSpec, TestHost};
use commissaire_e2e::library;
use commissaire_e2e::probe::{
    cmdline, environ, metric, ready_messages, request, spec, wait_for_host, RawCaller,
};
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

/// Copies built plugin `lib_name` into `dir` as `file`, by rename as the
/// README says to install one.
fn install(lib_name: &str, dir: &Path, file: &str) {
    let staged = dir.join(format!(".{file}.new"));
    std::fs::copy(library(lib_name), &staged).expect("copy the plugin");
    std::fs::rename(&staged, dir.join(file)).expect("rename the plugin into place");
}

#[test]
fn run_exits_1_when_two_plugins_export_one_service() {
    for base in [spec(&["simple"]), HostSpec::memory()] {
        let dir = tempfile::tempdir().expect("temp dir");
        install("simple", dir.path(), "libsimple.so");
        install("simple", dir.path(), "libsimple_again.so");
        let mut spec = base;
        spec.plugins = vec!["simple"];
        spec.plugins_dir = Some(dir.path().to_owned());
        let bus = spec.bus_uri.clone();
        let mut host = TestHost::start_expecting_failure(spec, "");
        let status = host.wait(Duration::from_secs(60));
        let log = host.stderr();
        assert_eq!(status.code(), Some(1), "on {bus}:\n{log}");
        let line = log
            .lines()
            .find(|l| l.contains("libsimple_again.so"))
            .unwrap_or_else(|| panic!("no line names the second file, on {bus}:\n{log}"));
        assert!(line.contains("libsimple.so"), "{line}");
    }
}

#[test]
fn run_exits_1_when_a_plugin_s_init_fails() {
    for base in [spec(&["demo"]), HostSpec::memory()] {
        let mut spec = base;
        spec.plugins = vec!["demo"];
        let services = format!(
            "[[service]]\nname = \"demo\"\nqueues = [{{ name = \"{}\", routing_key = \"demo.*\" }}]\n\
             config = {{ greeting = 3 }}\n",
            spec.queue("demo")
        );
        let bus = spec.bus_uri.clone();
        let mut host = TestHost::start_expecting_failure(spec, &services);
        let status = host.wait(Duration::from_secs(60));
        let log = host.stderr();
        assert_eq!(status.code(), Some(1), "on {bus}:\n{log}");
        let line = log
            .lines()
            .find(|l| l.contains("failed to start"))
            .unwrap_or_else(|| panic!("no line says it, on {bus}:\n{log}"));
        assert!(
            line.contains("service `demo`") && line.contains("`greeting` must be a string, not 3"),
            "on {bus}: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_past_shutdown_timeout_exits_0_and_hands_the_request_back() {
    let mut spec = spec(&["demo"]);
    spec.extra_toml = "\n[host]\nshutdown_timeout = 1\n".to_owned();
    let mut host = TestHost::start(spec.clone());
    let queue = spec.queue("demo");
    let mut caller = RawCaller::connect(&spec.exchange).await;
    // Longer than the shutdown timeout, short enough for the next host.
    caller
        .send("demo.sleep", &request("slow", "sleep", json!([8000])), None)
        .await;
    let in_flight = "commissaire_in_flight{service=\"demo\"}";
    wait_for_host(&host, Duration::from_secs(30), "the handler runs", || {
        metric(host.http, in_flight).is_some_and(|n| n >= 1.0)
    });

    host.signal("TERM");
    let status = host.wait(Duration::from_secs(60));
    let log = host.stderr();
    assert!(status.success(), "the host exits 0: {status}\n{log}");
    assert!(
        log.contains(
            "handlers still running at the shutdown timeout; their requests go back to the queue"
        ),
        "{log}"
    );
    assert_eq!(
        ready_messages(&queue).await,
        1,
        "the request is back in its queue:\n{log}"
    );

    // Another host on the same queue answers it.
    let second = TestHost::start(spec);
    let reply = caller.next(Duration::from_secs(60)).await;
    assert_eq!(reply.body["id"], "slow", "{}", reply.body);
    assert_eq!(reply.body["result"], "slept", "{}", reply.body);
    caller.close().await;
    drop(second);
    drop(host);
}

/// Deletes queue `name` when dropped (also when the test fails), unless
/// somebody consumes it: `older` is the default queue of a plugin without
/// a `[[service]]` entry, a name no test can make its own.
struct DeletedIfUnused(&'static str);

impl Drop for DeletedIfUnused {
    fn drop(&mut self) {
        let name = self.0;
        let delete = async move {
            let conn = Connection::connect(&amqp_uri(), ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            let _ = ch
                .queue_delete(
                    name.into(),
                    QueueDeleteOptions {
                        if_unused: true,
                        ..Default::default()
                    },
                )
                .await;
            conn.close(200, "bye".into()).await
        };
        // On a thread of its own: the test itself runs on a runtime.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(delete))
        })
        .join();
    }
}

fn services(host: &TestHost) -> Vec<String> {
    let (_, health) = host.health();
    health["services"]
        .as_object()
        .map(|s| s.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_starts_a_new_plugin_s_workers_and_stops_a_removed_one_s() {
    let _older = DeletedIfUnused("older");
    let dir = tempfile::tempdir().expect("temp dir");
    install("simple", dir.path(), "libsimple.so");
    let mut spec = spec(&["simple"]);
    spec.plugins_dir = Some(dir.path().to_owned());
    let host = TestHost::start(spec);
    assert_eq!(services(&host), ["simple"]);
    let mut caller = RawCaller::connect(&host.spec.exchange).await;

    // A plugin without a [[service]] entry: served on queue `older`.
    install("fixture_older", dir.path(), "libfixture_older.so");
    host.signal("HUP");
    wait_for_host(&host, Duration::from_secs(60), "`older` consuming", || {
        host.health().1["services"]["older"]["status"] == "consuming"
    });
    caller
        .send("older.ping", &request("o", "ping", json!([])), None)
        .await;
    let reply = caller.next(Duration::from_secs(30)).await;
    assert_eq!(reply.body["result"], "pong from older", "{}", reply.body);
    let older_pids = host.worker_pids("older");
    assert!(!older_pids.is_empty(), "{:?}", host.health());

    std::fs::remove_file(dir.path().join("libfixture_older.so")).expect("remove the plugin");
    host.signal("HUP");
    wait_for_host(
        &host,
        Duration::from_secs(60),
        "`older` gone from /healthz",
        || services(&host) == ["simple"],
    );
    wait_for_host(
        &host,
        Duration::from_secs(60),
        "`older`'s workers exit",
        || {
            older_pids
                .iter()
                .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        },
    );
    let log = host.stderr();
    assert!(log.contains("new plugin: starting its workers"), "{log}");
    assert!(
        log.contains("plugin removed: stopping its workers"),
        "{log}"
    );
    // `simple` served throughout.
    caller
        .send("simple.add", &request("s", "add", json!([1, 2])), None)
        .await;
    assert_eq!(caller.next(Duration::from_secs(30)).await.body["result"], 3);
    caller.close().await;
    drop(host);
}

/// A plugin a `[[service]]` entry names cannot be removed by `SIGHUP`:
/// the reload is refused as for a directory that fails the check, and its
/// workers go on serving.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_after_removing_a_configured_plugin_is_refused_and_it_goes_on_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    install("simple", dir.path(), "libsimple.so");
    install("demo", dir.path(), "libdemo.so");
    let mut spec = spec(&["simple", "demo"]);
    spec.plugins_dir = Some(dir.path().to_owned());
    let host = TestHost::start(spec);
    std::fs::remove_file(dir.path().join("libdemo.so")).expect("remove the plugin");
    host.signal("HUP");
    wait_for_host(&host, Duration::from_secs(60), "the reload refused", || {
        host.stderr()
            .contains("reload refused: every service stays on its last good version")
    });
    let log = host.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("reload refused"))
        .unwrap_or_default();
    assert!(
        line.contains("`demo`"),
        "the line names the service: {line}"
    );
    assert_eq!(services(&host), ["demo", "simple"]);
    let mut caller = RawCaller::connect(&host.spec.exchange).await;
    caller
        .send("demo.ping", &request("p", "ping", json!([])), None)
        .await;
    assert_eq!(
        caller.next(Duration::from_secs(30)).await.body["result"],
        "pong"
    );
    caller.close().await;
}

/// Sends `simple.add` requests, 16 at a time, until `done` says so, and
/// counts the replies that are not `1 + 2 = 3`.
async fn add_until(caller: &mut RawCaller, done: impl Fn() -> bool) -> (u32, u32) {
    const AT_ONCE: u32 = 16;
    let (mut sent, mut wrong) = (0u32, 0u32);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !done() && std::time::Instant::now() < deadline {
        for _ in 0..AT_ONCE {
            caller
                .send("simple.add", &request("l", "add", json!([1, 2])), None)
                .await;
        }
        sent += AT_ONCE;
        for _ in 0..AT_ONCE {
            if caller.next(Duration::from_secs(30)).await.body["result"] != 3 {
                wrong += 1;
            }
        }
    }
    (sent, wrong)
}

/// A SIGHUP roll compares each served service's new contract with the
/// running one: a plugin that would break the service's callers (a
/// required argument added, a method removed, a type changed) is not
/// rolled, and the old version answers on without an error; a compatible
/// one (a new method, a new optional argument) rolls.
#[tokio::test(flavor = "multi_thread")]
async fn a_roll_that_breaks_callers_is_refused_and_a_compatible_one_goes_through() {
    let dir = tempfile::tempdir().expect("temp dir");
    install("simple", dir.path(), "libsimple.so");
    let mut spec = spec(&["simple"]);
    spec.plugins_dir = Some(dir.path().to_owned());
    let host = TestHost::start(spec);
    let mut caller = RawCaller::connect(&host.spec.exchange).await;

    install("fixture_simple_breaking", dir.path(), "libsimple.so");
    host.signal("HUP");
    let refused = || host.stderr().contains("upgrade refused");
    let (sent, wrong) = add_until(&mut caller, refused).await;
    assert!(
        refused(),
        "no refusal after {sent} requests: {}",
        host.stderr()
    );
    assert_eq!(
        wrong, 0,
        "{wrong} of {sent} requests failed during the refused roll"
    );
    let log = host.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("upgrade refused"))
        .unwrap_or_default();
    for difference in ["`add`", "`z`", "`wordy_add`", "`add_async`"] {
        assert!(line.contains(difference), "{difference} not named: {line}");
    }
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("upgrade refused"))
            .count(),
        1,
        "one line: {log}"
    );
    assert_eq!(
        host.metric("commissaire_upgrades_refused_total{service=\"simple\"}"),
        1
    );
    assert!(
        host.metric(
            "commissaire_upgrade_breaking_changes{service=\"simple\",change=\"method_removed\"}"
        ) >= 1
    );
    // The old version serves: it has no `version` method.
    caller
        .send("simple.version", &request("v", "version", json!([])), None)
        .await;
    let reply = caller.next(Duration::from_secs(30)).await;
    assert_eq!(reply.body["error"]["code"], -32601, "{}", reply.body);

    install("fixture_simple_compatible", dir.path(), "libsimple.so");
    host.signal("HUP");
    // The refused roll finished too: this is the second.
    wait_for_host(&host, Duration::from_secs(90), "the roll", || {
        host.stderr().matches("roll finished").count() == 2
    });
    caller
        .send("simple.version", &request("v", "version", json!([])), None)
        .await;
    let reply = caller.next(Duration::from_secs(30)).await;
    assert_eq!(reply.body["result"], "compatible", "{}", reply.body);
    caller
        .send("simple.add", &request("a", "add", json!([1, 2])), None)
        .await;
    assert_eq!(caller.next(Duration::from_secs(30)).await.body["result"], 3);
    assert_eq!(
        host.stderr().matches("upgrade refused").count(),
        1,
        "the compatible roll was not refused"
    );
    caller.close().await;
}

#[test]
fn workers_get_neither_the_http_token_nor_the_bus_uri_on_their_command_line() {
    const TOKEN: &str = "gap-token-7f3c9a";
    let mut spec = spec(&["simple"]);
    spec.service_toml = "workers = 2\n".to_owned();
    spec.env = vec![("COMMISSAIRE_HTTP_TOKEN".to_owned(), TOKEN.to_owned())];
    let host = TestHost::start(spec);
    let supervisor = host.pid().expect("running");
    // What the test reads is the environment the processes have: the
    // supervisor has the token.
    assert!(
        environ(supervisor).contains(&format!("COMMISSAIRE_HTTP_TOKEN={TOKEN}")),
        "{:?}",
        environ(supervisor)
    );
    let workers = host.worker_pids("simple");
    assert_eq!(workers.len(), 2, "{:?}", host.health());
    for pid in workers {
        let env = environ(pid);
        let args = cmdline(pid);
        assert!(
            args.first()
                .is_some_and(|a| a.ends_with("commissaire-host"))
                && args.get(1).is_some_and(|a| a == "worker"),
            "pid {pid} is a worker: {args:?}"
        );
        assert!(
            !env.iter()
                .any(|e| e.starts_with("COMMISSAIRE_HTTP_TOKEN=") || e.contains(TOKEN)),
            "worker {pid} has the token: {env:?}"
        );
        let joined = args.join(" ");
        for secret in [host.spec.bus_uri.as_str(), "amqp://", "guest:guest"] {
            assert!(
                !joined.contains(secret),
                "worker {pid}'s command line holds {secret:?}: {joined}"
            );
        }
        assert!(
            env.iter()
                .any(|e| e.starts_with("COMMISSAIRE_WORKER_BUS_URI=")),
            "the worker gets the URI from its environment: {env:?}"
        );
    }
}
