//! Misbehaving plugins (issue 33): the last good version keeps serving
//! after a failed roll, a stuck `init` is caught, a crash blames only its
//! culprit, plugin output and worker memory are bounded. The plugin is `tests/fixtures/plugin-misbehave`
//! (service `bp`), built in several versions; queues are `bp-…`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use commissaire_e2e::host::{cleanup_broker, unique, HostSpec, TestHost};
use commissaire_e2e::{library, misbehave_library};
use serde_json::{json, Value};

fn kill(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status();
}

fn wait_until(limit: Duration, what: &str, host: &TestHost, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(
            started.elapsed() < limit,
            "{what} within {limit:?}:\n{}",
            host.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn service_health(host: &TestHost, service: &str) -> Value {
    host.health().1["services"][service].clone()
}

/// `service` has `n` workers, all consuming, none of them in `old`.
fn replaced(host: &TestHost, service: &str, n: usize, old: &[u32]) -> bool {
    let pids = host.worker_pids(service);
    pids.len() == n
        && pids.iter().all(|p| !old.contains(p))
        && service_health(host, service)["consuming"] == n
}

/// Puts `library` in `dir` as `libmisbehave.so`, renamed into place (as a
/// package manager installs).
fn install(dir: &Path, library: &Path) {
    let name = library.file_name().expect("a file name");
    let staged = dir.join("incoming.tmp");
    std::fs::copy(library, &staged).expect("stage the plugin");
    std::fs::rename(&staged, dir.join(name)).expect("install the plugin");
}

/// The queues of one test, deleted at its end (after its host stopped).
struct Queues {
    exchange: String,
    names: Vec<String>,
}

impl Drop for Queues {
    fn drop(&mut self) {
        cleanup_broker(&self.exchange, &self.names);
    }
}

/// A host serving `bp` (with `bp_toml` in its entry) and `simple`, both
/// with `workers = 2`, from a plugin directory of the test's own.
fn start(bp_toml: &str, plugins: &Path) -> (TestHost, Queues) {
    let mut spec = HostSpec::amqp();
    spec.plugins_dir = Some(plugins.to_owned());
    let (bp, simple) = (unique("bp-bp"), unique("bp-simple"));
    let queues = Queues {
        exchange: spec.exchange.clone(),
        names: vec![bp.clone(), simple.clone()],
    };
    let services = format!(
        "[[service]]\nname = \"bp\"\nworkers = 2\nqueues = [{{ name = \"{bp}\", routing_key = \"bp.*\" }}]\n{bp_toml}\n\
         [[service]]\nname = \"simple\"\nworkers = 2\nqueues = [{{ name = \"{simple}\", routing_key = \"simple.*\" }}]\n"
    );
    let mut host = TestHost::start_with_services(spec, &services);
    // Deleted once the host has stopped (a running host declares them
    // again); `Queues` still deletes them for a host that failed to start.
    host.also_clean([bp, simple]);
    (host, queues)
}

/// A process's resident memory, in bytes (0 once it is gone).
fn resident_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn plugin_dir_with(v: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    install(dir.path(), &misbehave_library(v));
    install(dir.path(), &library("simple"));
    dir
}

fn version(host: &TestHost, id: u64) -> (u16, Value) {
    let (status, reply) = host.http_call("bp.version", &json!({"id": id}));
    (status, reply["result"].clone())
}

/// A roll whose new `bp` fails in its `init`: `bp` stays on v1 even when
/// every one of its workers is then killed, `simple` (queued behind it) is
/// rolled, one line names `bp` as not rolled, and the next SIGHUP with a
/// good build rolls `bp` too.
#[test]
fn a_failed_roll_keeps_the_last_good_version_through_kill_9() {
    let plugins = plugin_dir_with("v1");
    let (host, _queues) = start("config = { fail_init_in = [\"v2\"] }", plugins.path());
    assert_eq!(version(&host, 1), (200, json!("v1")));
    let (bp_before, simple_before) = (host.worker_pids("bp"), host.worker_pids("simple"));
    assert_eq!((bp_before.len(), simple_before.len()), (2, 2));

    install(plugins.path(), &misbehave_library("v2"));
    host.signal("HUP");
    wait_until(Duration::from_secs(60), "the roll finished", &host, || {
        host.stderr().contains("roll finished")
    });
    let log = host.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("roll finished"))
        .unwrap_or_default();
    assert!(
        line.contains("not_rolled=bp") && line.contains("last good version"),
        "{line}\n{log}"
    );
    // The service queued behind the failed one was rolled.
    wait_until(Duration::from_secs(20), "simple rolled", &host, || {
        replaced(&host, "simple", 2, &simple_before)
    });
    assert_eq!(host.worker_pids("bp"), bp_before, "bp's workers stay");

    // Every bp worker killed: the restarts load v1, not the file on disk.
    for pid in &bp_before {
        kill("KILL", *pid);
    }
    wait_until(
        Duration::from_secs(30),
        "bp's workers restarted",
        &host,
        || replaced(&host, "bp", 2, &bp_before),
    );
    let mut answered_v1 = 0;
    for id in 0..200 {
        if version(&host, id) == (200, json!("v1")) {
            answered_v1 += 1;
        }
    }
    let log = host.stderr();
    eprintln!(
        "failed roll then kill -9 of both workers: {answered_v1} of 200 answered v1, \
         {} failed starts",
        log.matches("could not start").count()
    );
    assert_eq!(answered_v1, 200, "{log}");
    assert!(!log.contains("worker could not start"), "{log}");

    // The next SIGHUP tries bp again.
    install(plugins.path(), &misbehave_library("v3"));
    let bp_before = host.worker_pids("bp");
    host.signal("HUP");
    wait_until(Duration::from_secs(60), "bp rolled to v3", &host, || {
        replaced(&host, "bp", 2, &bp_before) && version(&host, 7) == (200, json!("v3"))
    });
}

/// A host whose `bp` plugin's `init` hangs (v1), with `init_timeout`
/// seconds and `extra_toml`; not waited for (it may never be healthy).
fn hanging_init(init_timeout: u32, extra_toml: &str) -> (TestHost, tempfile::TempDir, Queues) {
    let plugins = plugin_dir_with("v1");
    let mut spec = HostSpec::amqp();
    spec.plugins_dir = Some(plugins.path().to_owned());
    spec.extra_toml = extra_toml.to_owned();
    let bp = unique("bp-bp");
    let queues = Queues {
        exchange: spec.exchange.clone(),
        names: vec![bp.clone()],
    };
    let services = format!(
        "[[service]]\nname = \"bp\"\ninit_timeout = {init_timeout}\nqueues = [{{ name = \"{bp}\", routing_key = \"bp.*\" }}]\n\
         config = {{ hang_init_in = [\"v1\"] }}\n"
    );
    (
        TestHost::start_expecting_failure(spec, &services),
        plugins,
        queues,
    )
}

/// An `init` that never returns at start-up: `run` ends with status 1 and
/// one line naming the service once `init_timeout` passed.
#[test]
fn an_init_that_never_returns_at_start_up_ends_run() {
    let (mut host, _plugins, _queues) = hanging_init(1, "");
    let status = host.wait(Duration::from_secs(60));
    let log = host.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("init did not return within"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("service=bp") && l.contains("ERROR")),
        "{log}"
    );
    assert!(
        log.contains("service `bp`: the plugin's init did not return within 1 s (init_timeout)"),
        "{log}"
    );
}

/// SIGTERM while a worker is stuck in `init` (long before its
/// `init_timeout`): the worker holds no request, it is killed at once and
/// `run` ends well before `shutdown_timeout`.
#[test]
fn sigterm_does_not_wait_for_a_stuck_init() {
    let (mut host, _plugins, _queues) = hanging_init(600, "\n[host]\nshutdown_timeout = 120\n");
    wait_until(
        Duration::from_secs(30),
        "bp's worker started",
        &host,
        || host.stderr().contains("worker started"),
    );
    host.signal("TERM");
    // shutdown_timeout + 5 s is 125 s: the stuck worker must not hold it.
    let status = host.wait(Duration::from_secs(30));
    assert!(status.success(), "{}", host.stderr());
}

/// A worker whose `init` hangs once the host served (what it depends on
/// went away) is killed at `init_timeout`, with one line and a metric;
/// the other service is served meanwhile, and a SIGHUP with a build that
/// copes replaces the stuck service's workers.
#[test]
fn an_init_stuck_after_start_is_caught_and_a_sighup_fix_takes_effect() {
    let plugins = plugin_dir_with("v1");
    let flags = tempfile::tempdir().expect("temp dir");
    let prefix = flags.path().join("hang-");
    let (host, _queues) = start(
        &format!(
            "init_timeout = 2\nconfig = {{ hang_init_while = \"{}\" }}",
            prefix.display()
        ),
        plugins.path(),
    );
    assert_eq!(version(&host, 1), (200, json!("v1")));
    let bp_before = host.worker_pids("bp");
    std::fs::write(format!("{}v1", prefix.display()), b"").expect("the hang flag");
    for pid in &bp_before {
        kill("KILL", *pid);
    }
    wait_until(
        Duration::from_secs(60),
        "both stuck inits caught",
        &host,
        || host.metric("commissaire_init_timeouts_total{service=\"bp\"}") >= 2,
    );
    let log = host.stderr();
    let caught = log
        .lines()
        .filter(|l| l.contains("init did not return within init_timeout"))
        .count();
    assert!(caught >= 2, "{log}");
    assert!(
        log.lines()
            .filter(|l| l.contains("init did not return within init_timeout"))
            .all(|l| l.contains("ERROR") && l.contains("service=bp")),
        "{log}"
    );
    // The other service is served meanwhile.
    for id in 0..20 {
        let (status, reply) = host.http_call("simple.add", &json!({"id": id, "params": [id, 1]}));
        assert_eq!((status, reply["result"].clone()), (200, json!(id + 1)));
    }
    assert_ne!(host.health().0, 200, "bp is not served: /healthz says so");

    install(plugins.path(), &misbehave_library("v2"));
    host.signal("HUP");
    wait_until(Duration::from_secs(60), "bp served by v2", &host, || {
        replaced(&host, "bp", 2, &bp_before) && version(&host, 9) == (200, json!("v2"))
    });
    assert_eq!(host.health().0, 200);
    let caught = host.metric("commissaire_init_timeouts_total{service=\"bp\"}");
    eprintln!(
        "a stuck init after start: {caught} workers killed at init_timeout before the SIGHUP fix"
    );
}

/// About 100 MB of plugin output, on stdout and stderr, in short lines and
/// in two 20 MB lines: the log grows by a bounded amount (at most 100
/// lines a second per worker, each cut at 4 KiB), every line left out is
/// counted in a `suppressed=N` line, and the service still answers.
#[test]
fn a_hundred_megabytes_of_plugin_output_make_a_bounded_log() {
    let plugins = plugin_dir_with("v1");
    let (host, _queues) = start("", plugins.path());
    let log_before = host.stderr().len();
    let mut written = 0u64;
    let mut id = 0;
    let mut shout = |stream: &str, lines: u64, bytes: u64| {
        id += 1;
        let (status, reply) = host.http_call(
            "bp.shout",
            &json!({"id": id, "params": [stream, lines, bytes]}),
        );
        assert_eq!((status, &reply["result"]), (200, &json!(lines)), "{reply}");
        written += lines;
    };
    // The long lines first, while the second's budget of lines is fresh:
    // after a burst they would be counted, not shown, and their cutting
    // not seen.
    shout("stdout", 1, 20 << 20);
    shout("stderr", 1, 20 << 20);
    for _ in 0..4 {
        shout("stdout", 100_000, 100);
        shout("stderr", 100_000, 100);
    }
    // Every line is either logged or counted as left out.
    let accounted = |log: &str| -> (u64, u64) {
        let shown = log
            .lines()
            .filter(|l| {
                l.contains("worker output") && l.contains("service=bp") && l.contains("output=")
            })
            .count() as u64;
        let suppressed = log
            .lines()
            .filter_map(|l| l.split("suppressed=").nth(1))
            .filter_map(|n| n.split_whitespace().next()?.parse::<u64>().ok())
            .sum::<u64>();
        (shown, suppressed)
    };
    wait_until(
        Duration::from_secs(30),
        "every line logged or counted",
        &host,
        || {
            let (shown, suppressed) = accounted(&host.stderr());
            shown + suppressed == written
        },
    );
    let log = host.stderr();
    let grown = log.len() - log_before;
    let (shown, suppressed) = accounted(&log);
    let longest = log.lines().map(str::len).max().unwrap_or_default();
    eprintln!(
        "~100 MB of plugin output ({written} lines): the log grew by {grown} bytes, \
         {shown} lines shown, {suppressed} counted as left out, longest log line {longest} bytes"
    );
    assert!(grown < 4 << 20, "the log grew by {grown} bytes");
    assert!(longest < 8 << 10, "a log line of {longest} bytes");
    assert!(
        log.contains("a long line, cut at 4096 bytes") && log.contains("bytes=20971520"),
        "the long lines are cut, their length said"
    );
    assert_eq!(version(&host, 99), (200, json!("v1")));
}

/// A handler that leaks 20 MiB a call, 100 calls from 4 callers, under
/// `max_worker_rss = "128 MiB"`: workers are replaced as they pass the
/// cap (one line and a count each), no worker ever grows far past it, and
/// every call is answered.
#[test]
fn a_leaking_handler_is_recycled_at_the_cap_with_no_failed_request() {
    let plugins = plugin_dir_with("v1");
    let (host, _queues) = start("max_worker_rss = \"128 MiB\"", plugins.path());
    let host = std::sync::Arc::new(host);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (host, done) = (host.clone(), done.clone());
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                for pid in host.worker_pids("bp") {
                    peak = peak.max(resident_bytes(pid));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let callers: Vec<_> = (0..4)
        .map(|c| {
            let host = host.clone();
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                for i in 0..25 {
                    let (status, reply) =
                        host.http_call("bp.leak", &json!({"id": c * 100 + i, "params": [20]}));
                    if status != 200 || !reply["result"].is_u64() {
                        failed.push((status, reply));
                    }
                }
                failed
            })
        })
        .collect();
    let failed: Vec<_> = callers
        .into_iter()
        .flat_map(|c| c.join().expect("a caller"))
        .collect();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().expect("the sampler");
    let recycled = host.metric("commissaire_rss_recycles_total{service=\"bp\"}");
    let log = host.stderr();
    let lines = log.matches("worker over max_worker_rss").count();
    eprintln!(
        "100 calls leaking 20 MiB each under max_worker_rss = 128 MiB: {} failed, \
         {recycled} workers recycled ({lines} lines), {} crashes, peak worker RSS {} MiB",
        failed.len(),
        host.metric("commissaire_crashes_total{service=\"bp\"}"),
        peak >> 20
    );
    assert!(failed.is_empty(), "{failed:?}\n{log}");
    assert!(recycled >= 5, "{recycled} recycled\n{log}");
    assert_eq!(lines as u64, recycled, "one line per recycled worker");
    assert_eq!(
        host.metric("commissaire_crashes_total{service=\"bp\"}"),
        0,
        "{log}"
    );
    wait_until(
        Duration::from_secs(30),
        "bp's 2 workers consuming",
        &host,
        || service_health(&host, "bp")["consuming"] == 2,
    );
    assert_eq!(version(&host, 1), (200, json!("v1")));
}

/// A second file exporting `bp` dropped beside the first: every new worker
/// refuses the directory, so no service is rolled, one line names them
/// all, and the running workers, restarts included, keep serving v1.
#[test]
fn a_second_file_exporting_the_same_service_rolls_nothing() {
    let plugins = plugin_dir_with("v1");
    let (host, _queues) = start("", plugins.path());
    let bp_before = host.worker_pids("bp");
    let twin = plugins.path().join("libmisbehave_twin.so");
    std::fs::copy(misbehave_library("v2"), &twin).expect("the twin");
    host.signal("HUP");
    wait_until(Duration::from_secs(60), "the roll finished", &host, || {
        host.stderr().contains("roll finished")
    });
    let log = host.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("roll finished"))
        .unwrap_or_default();
    assert!(line.contains("not_rolled=bp, simple"), "{line}\n{log}");
    for pid in &bp_before {
        kill("KILL", *pid);
    }
    wait_until(
        Duration::from_secs(30),
        "bp's workers restarted",
        &host,
        || replaced(&host, "bp", 2, &bp_before),
    );
    for id in 0..20 {
        assert_eq!(version(&host, id), (200, json!("v1")));
    }
}

/// Healthy requests, and the segfaulting ones sent among them, of
/// [`segfaulting_requests_are_refused_and_their_healthy_neighbours_answered`].
const PINGS: usize = 3000;
/// Rounds of segfaulting requests, evenly among the pings.
const SEGV_ROUNDS: usize = 10;
/// Segfaulting requests sent together in each round.
const SEGV_AT_ONCE: usize = 3;
/// The default `crash_limit`.
const CRASH_LIMIT: usize = 3;

/// Whether load request `i` is a segfaulting one (the first
/// [`SEGV_AT_ONCE`] of each round).
fn is_segv(i: usize) -> bool {
    let round = (PINGS + SEGV_ROUNDS * SEGV_AT_ONCE) / SEGV_ROUNDS;
    i % round >= round / 2 && i % round < round / 2 + SEGV_AT_ONCE
}

/// Segfaulting requests among 3,000 pings at 16 in flight (`workers = 2`,
/// each worker running up to 16): a worker that dies running several
/// requests blames none of them, each runs alone when it comes back, and
/// only a crash while alone counts. So no ping is refused, each segfault
/// is refused after exactly `crash_limit` crashes of its own, and a dead
/// worker is replaced at once when it was the service's last.
#[test]
fn segfaulting_requests_are_refused_and_their_healthy_neighbours_answered() {
    use commissaire_e2e::load::{Load, Progress};
    let plugins = plugin_dir_with("v1");
    let (host, _queues) = start("", plugins.path());
    let total = PINGS + SEGV_ROUNDS * SEGV_AT_ONCE;
    let segvs = (0..total).filter(|i| is_segv(*i)).count();
    assert_eq!(segvs, SEGV_ROUNDS * SEGV_AT_ONCE);
    let load = Load {
        exchange: host.spec.exchange.clone(),
        total,
        concurrency: 16,
        deadline: Duration::from_secs(240),
        request: std::sync::Arc::new(|i| {
            let method = if is_segv(i) { "bp.segv" } else { "bp.ping" };
            (method.to_owned(), json!([]))
        }),
        broker: None,
        give_up_after: None,
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(load.run(std::sync::Arc::new(Progress::default())));
    let refusal = format!("request crashed the worker {CRASH_LIMIT} times");
    let log = host.stderr();
    let counts = report
        .tally
        .judge("pings and segfaults", |i, reply| {
            if is_segv(*i) {
                (reply["error"]["code"] == -32603 && reply["error"]["message"] == *refusal)
                    .then_some("segv refused")
            } else {
                (reply["result"] == "pong").then_some("pong")
            }
        })
        .with_context(log.clone());
    let deaths = log.matches("signal 11 (SIGSEGV)").count();
    let own = log.matches("a crash of its own").count();
    let crowds = log.matches("requests were running side by side").count();
    let refused_pings = counts.wrong.iter().filter(|(i, _)| !is_segv(*i)).count();
    let backed_off = log
        .lines()
        .filter(|l| l.contains("restart_in_ms=") && !l.ends_with("restart_in_ms=0"))
        .count();
    eprintln!(
        "{PINGS} pings, {SEGV_AT_ONCE} segv at a time in {SEGV_ROUNDS} rounds, 16 in flight: \
         {refused_pings} pings not answered pong, {} segv refused, {} duplicated, \
         {deaths} worker deaths by SIGSEGV ({own} crashes of a request of its own, \
         {crowds} with several running; {backed_off} restarts backed off), \
         longest time without a reply {:.2}s, {:.1}s in all",
        counts.outcome("segv refused"),
        counts.duplicated,
        report.max_gap.as_secs_f64(),
        report.elapsed.as_secs_f64()
    );
    counts
        .lost_none()
        .outcome_exactly("pong", PINGS)
        .outcome_exactly("segv refused", segvs)
        // Only a worker dying with several requests running can answer one
        // twice (one that had replied, not acked): at most a worker's
        // concurrency per such death.
        .duplicated_at_most(crowds * 16, "a worker's window per death beside others");
    // Restarting the service's last worker at once: no wait as long as the
    // 2 s a backoff may last.
    assert!(
        report.max_gap < Duration::from_secs(2),
        "{:?} without a reply\n{log}",
        report.max_gap
    );
    // Exactly crash_limit crashes of its own per segfault (none for a
    // ping), and every other death was one with several running. (The
    // broker hands a dead worker's request on as soon as its socket
    // closes, before the process can be reaped: the supervisor waits for
    // that death before it answers the next worker's check.)
    assert_eq!(own, segvs * CRASH_LIMIT, "{log}");
    assert_eq!(deaths, own + crowds, "{log}");
    assert!(crowds <= segvs, "{crowds} deaths beside others\n{log}");
    wait_until(
        Duration::from_secs(30),
        "bp's 2 workers consuming",
        &host,
        || service_health(&host, "bp")["consuming"] == 2,
    );
}
