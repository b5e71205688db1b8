//! What the supervisor tells systemd when it runs as a `Type=notify`
//! service (`dist/systemd/`): `READY=1` once every service is consuming
//! (when `/healthz` first turns 200), `RELOADING=1` then `READY=1` around
//! a SIGHUP roll, `STOPPING=1` at SIGTERM, a `STATUS=` line for
//! `systemctl status`, and `WATCHDOG=1` pings while the supervisor runs and
//! no worker has gone silent, so that systemd restarts a wedged host.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) it sends nothing. The decisions
//! are a pure function of time and state ([`Notifier::messages`]); only
//! [`Notifier::send`] does I/O.

use std::time::{Duration, Instant};

/// How long a worker that has reported before may stay silent before it
/// counts as wedged (workers report at least every 2 s).
pub const SILENT_LIMIT: Duration = Duration::from_secs(10);

/// The supervisor's state, as systemd is told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Every service has had a consuming worker (`READY=1` from then on).
    pub started: bool,
    /// A SIGHUP roll is under way.
    pub rolling: bool,
    /// SIGTERM or SIGINT was received.
    pub stopping: bool,
    /// Services served.
    pub services: usize,
    /// Workers consuming now, of those configured.
    pub consuming: usize,
    /// Workers configured.
    pub workers: usize,
    /// Requests answered since start.
    pub served: u64,
    /// A worker silent past [`SILENT_LIMIT`], and for how long.
    pub wedged: Option<(String, u32, Duration)>,
}

/// What has been said to systemd, and when to ping next.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    /// Half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises.
    ping_every: Option<Duration>,
    last_ping: Option<Instant>,
    ready: bool,
    reloading: bool,
    stopping: bool,
    status: String,
    status_at: Option<Instant>,
    wedged_logged: bool,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`,
    /// `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        Self::new(enabled, sd_notify::watchdog_enabled())
    }

    /// A notifier that sends when `enabled`, pinging the watchdog within
    /// `watchdog` if given.
    pub fn new(enabled: bool, watchdog: Option<Duration>) -> Self {
        Self {
            enabled,
            ping_every: watchdog
                .filter(|w| !w.is_zero())
                .map(|w| (w / 2).max(Duration::from_millis(1))),
            last_ping: None,
            ready: false,
            reloading: false,
            stopping: false,
            status: String::new(),
            status_at: None,
            wedged_logged: false,
        }
    }

    /// Whether anything is ever sent or watched: not outside systemd.
    pub fn active(&self) -> bool {
        self.enabled || self.ping_every.is_some()
    }

    /// The messages due at `now` in `state`, each one datagram.
    pub fn messages(&mut self, now: Instant, state: &State) -> Vec<String> {
        let mut out = Vec::new();
        if state.stopping {
            if !self.stopping {
                self.stopping = true;
                out.push("STOPPING=1".to_owned());
            }
        } else if state.rolling && self.ready && !self.reloading {
            self.reloading = true;
            out.push(format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        } else if state.started && (!self.ready || (self.reloading && !state.rolling)) {
            self.ready = true;
            self.reloading = false;
            out.push("READY=1".to_owned());
        }
        let status = status_line(state);
        let status_due = self
            .status_at
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
        if status != self.status && (status_due || !out.is_empty()) {
            out.push(format!("STATUS={status}"));
            self.status = status;
            self.status_at = Some(now);
        }
        if let Some(every) = self.ping_every {
            let due = self
                .last_ping
                .is_none_or(|at| now.duration_since(at) >= every);
            match &state.wedged {
                None => {
                    self.wedged_logged = false;
                    if due {
                        self.last_ping = Some(now);
                        out.push("WATCHDOG=1".to_owned());
                    }
                }
                Some((service, pid, silent)) => {
                    if !self.wedged_logged {
                        self.wedged_logged = true;
                        tracing::error!(
                            service,
                            pid,
                            silent_s = silent.as_secs(),
                            "a worker stopped reporting: no more watchdog pings, systemd will \
                             restart the host"
                        );
                    }
                }
            }
        }
        out
    }

    /// Sends what is due at `now` in `state`.
    pub fn send(&mut self, now: Instant, state: &State) {
        for message in self.messages(now, state) {
            if !self.enabled {
                continue;
            }
            let states = [sd_notify::NotifyState::Custom(&message)];
            if let Err(e) = sd_notify::notify(&states) {
                crate::throttled!(warn!(error = %e, "cannot notify systemd"));
            }
        }
    }
}

/// What `systemctl status` shows on its `Status:` line.
fn status_line(state: &State) -> String {
    let doing = if state.stopping {
        "stopping"
    } else if state.rolling {
        "rolling workers over (SIGHUP)"
    } else if state.started {
        "serving"
    } else {
        "starting"
    };
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut line = format!(
        "{doing}: {}, {} of {} consuming, {} served",
        plural(state.services as u64, "service", "services"),
        state.consuming,
        plural(state.workers as u64, "worker", "workers"),
        plural(state.served, "request", "requests"),
    );
    if let Some((service, pid, silent)) = &state.wedged {
        line.push_str(&format!(
            "; worker {pid} of {service} silent for {} s",
            silent.as_secs()
        ));
    }
    line
}

/// CLOCK_MONOTONIC now, in µs, as `RELOADING=1` needs it
/// (`Type=notify-reload`); 0 if the clock cannot be read.
fn monotonic_usec() -> i128 {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(sd_notify::NotifyState::MonotonicUsec(usec)) => usec,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            started: false,
            rolling: false,
            stopping: false,
            services: 2,
            consuming: 0,
            workers: 4,
            served: 0,
            wedged: None,
        }
    }

    fn kinds(messages: &[String]) -> Vec<&str> {
        messages
            .iter()
            .map(|m| m.split('=').next().unwrap_or_default())
            .collect()
    }

    #[test]
    fn ready_once_every_service_consumes_and_not_before() {
        let mut n = Notifier::new(true, None);
        let t0 = Instant::now();
        let mut s = state();
        assert_eq!(kinds(&n.messages(t0, &s)), ["STATUS"]);
        s.consuming = 4;
        s.started = true;
        let m = n.messages(t0 + Duration::from_millis(100), &s);
        assert_eq!(kinds(&m), ["READY", "STATUS"]);
        assert_eq!(
            m[1],
            "STATUS=serving: 2 services, 4 of 4 workers consuming, 0 requests served"
        );
        assert!(n.messages(t0 + Duration::from_secs(5), &s).is_empty());
    }

    #[test]
    fn a_roll_is_reloading_then_ready_and_a_stop_is_stopping() {
        let mut n = Notifier::new(true, None);
        let t0 = Instant::now();
        let mut s = state();
        s.started = true;
        n.messages(t0, &s);
        s.rolling = true;
        let m = n.messages(t0 + Duration::from_secs(1), &s);
        assert_eq!(kinds(&m), ["RELOADING", "STATUS"]);
        assert!(m[0].contains("\nMONOTONIC_USEC="), "{m:?}");
        assert!(n.messages(t0 + Duration::from_secs(1), &s).is_empty());
        s.rolling = false;
        assert_eq!(
            kinds(&n.messages(t0 + Duration::from_secs(2), &s)),
            ["READY", "STATUS"]
        );
        s.stopping = true;
        assert_eq!(
            kinds(&n.messages(t0 + Duration::from_secs(3), &s)),
            ["STOPPING", "STATUS"]
        );
        assert!(n.messages(t0 + Duration::from_secs(9), &s).is_empty());
    }

    #[test]
    fn the_watchdog_is_pinged_at_half_its_interval_until_a_worker_falls_silent() {
        let mut n = Notifier::new(true, Some(Duration::from_secs(2)));
        let t0 = Instant::now();
        let mut s = state();
        s.started = true;
        let pings = |m: Vec<String>| m.iter().filter(|m| *m == "WATCHDOG=1").count();
        assert_eq!(pings(n.messages(t0, &s)), 1);
        assert_eq!(pings(n.messages(t0 + Duration::from_millis(500), &s)), 0);
        assert_eq!(pings(n.messages(t0 + Duration::from_millis(1000), &s)), 1);
        s.wedged = Some(("simple".to_owned(), 42, Duration::from_secs(11)));
        for ms in [2000, 3000, 10_000] {
            assert_eq!(pings(n.messages(t0 + Duration::from_millis(ms), &s)), 0);
        }
        s.wedged = None;
        assert_eq!(pings(n.messages(t0 + Duration::from_secs(11), &s)), 1);
    }

    #[test]
    fn the_status_changes_at_most_once_a_second_unless_the_state_does() {
        let mut n = Notifier::new(true, None);
        let t0 = Instant::now();
        let mut s = state();
        s.started = true;
        n.messages(t0, &s);
        s.served = 10;
        assert!(n.messages(t0 + Duration::from_millis(300), &s).is_empty());
        assert_eq!(
            n.messages(t0 + Duration::from_millis(1000), &s),
            ["STATUS=serving: 2 services, 0 of 4 workers consuming, 10 requests served"]
        );
    }
}
