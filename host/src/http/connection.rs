//! Accepting connections and bounding them: how many at once, how long a
//! request head may take, how long a keep-alive connection may sit idle.
//!
//! hyper's own header-read timer starts whenever it waits for a request
//! head, idle keep-alive time included, so it cannot tell a slow head from
//! an idle connection. Each connection here has a [`Clock`] instead, fed by
//! the bytes it reads and writes and by the requests it serves.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long a client has to send a whole request head, from its first
/// byte (or from connecting).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a keep-alive connection may sit between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a connection was closed by its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    /// The request head did not arrive in time.
    Head,
    /// Nothing happened for too long between requests.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    /// Serving this many requests.
    Busy(u32),
    /// Between requests.
    Idle,
}

/// What one connection is doing, and since when.
#[derive(Debug)]
pub(super) struct Clock {
    state: Mutex<(Phase, Instant)>,
}

impl Clock {
    /// A connection accepted at `now`: its first head is due.
    pub(super) fn new(now: Instant) -> Self {
        Self {
            state: Mutex::new((Phase::Head, now)),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut (Phase, Instant)) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Bytes arrived: after an idle spell, a new request head has begun.
    pub(super) fn read(&self, now: Instant) {
        self.with(|s| {
            if s.0 == Phase::Idle {
                *s = (Phase::Head, now);
            }
        });
    }

    /// Bytes went out: a reply still being written keeps the connection
    /// from counting as idle.
    pub(super) fn wrote(&self, now: Instant) {
        self.with(|s| {
            if s.0 == Phase::Idle {
                s.1 = now;
            }
        });
    }

    /// A request's head was read and it is being served.
    pub(super) fn request_started(&self) {
        self.with(|s| {
            s.0 = match s.0 {
                Phase::Busy(n) => Phase::Busy(n.saturating_add(1)),
                Phase::Head | Phase::Idle => Phase::Busy(1),
            };
        });
    }

    /// A request was answered (or abandoned).
    pub(super) fn request_ended(&self, now: Instant) {
        self.with(|s| {
            *s = match s.0 {
                Phase::Busy(n) if n > 1 => (Phase::Busy(n - 1), s.1),
                _ => (Phase::Idle, now),
            };
        });
    }

    /// When the connection is due to close if nothing happens, and why;
    /// `None` while it serves a request.
    pub(super) fn deadline(&self) -> Option<(Instant, Expired)> {
        self.with(|s| match s.0 {
            Phase::Head => Some((s.1 + HEADER_READ_TIMEOUT, Expired::Head)),
            Phase::Idle => Some((s.1 + IDLE_TIMEOUT, Expired::Idle)),
            Phase::Busy(_) => None,
        })
    }

    /// Why the connection must close at `now`, if it must.
    pub(super) fn expired(&self, now: Instant) -> Option<Expired> {
        self.deadline()
            .and_then(|(at, why)| (now >= at).then_some(why))
    }
}

/// A socket that tells its connection's [`Clock`] when bytes move.
struct Watched<T> {
    io: T,
    clock: Arc<Clock>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read(Instant::now());
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote(Instant::now());
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.wrote(Instant::now());
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Marks a request as being served for as long as it lives.
struct Serving(Arc<Clock>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.request_ended(Instant::now());
    }
}

/// Accepts connections until `stop`, serving each with `app`; at most
/// `max_connections` at once: beyond, a new connection is closed at once.
pub(super) async fn accept_loop(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    // Set while the limit is reached, so that it is logged once per spell.
    let full = AtomicBool::new(false);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, most likely: give the process time to
                // close some rather than spin.
                tracing::warn!(error = %e, "HTTP endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_connections,
                    "HTTP endpoint at [http] max_connections: closing new connections at once"
                );
            }
            drop(stream);
            continue;
        };
        full.store(false, Ordering::Relaxed);
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, app, stop).await;
            drop(slot);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    stop: CancellationToken,
) {
    // Replies are written whole; do not hold the last segment back.
    let _ = stream.set_nodelay(true);
    let clock = Arc::new(Clock::new(Instant::now()));
    let io = TokioIo::new(Watched {
        io: stream,
        clock: clock.clone(),
    });
    let tower = TowerToHyperService::new(app);
    let service_clock = clock.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        service_clock.request_started();
        let serving = Serving(service_clock.clone());
        let response = hyper::service::Service::call(&tower, request);
        async move {
            let response = response.await;
            drop(serving);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The clock above times heads; hyper's timer would also cut idle
    // keep-alive connections at the head timeout.
    builder.header_read_timeout(None).keep_alive(true);
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut stopping = false;
    loop {
        let due = clock.deadline();
        let wake = due.map_or_else(
            // Serving a request: look again later.
            || tokio::time::Instant::now() + Duration::from_secs(1),
            |(at, _)| tokio::time::Instant::from_std(at),
        );
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(wake) => {
                if let Some(why) = clock.expired(Instant::now()) {
                    tracing::debug!(%peer, ?why, "HTTP connection closed by its timer");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_must_send_its_head_in_time() {
        let t0 = Instant::now();
        let c = Clock::new(t0);
        assert_eq!(c.expired(t0 + HEADER_READ_TIMEOUT / 2), None);
        // Bytes of the head do not extend its deadline.
        c.read(t0 + Duration::from_secs(9));
        assert_eq!(c.expired(t0 + HEADER_READ_TIMEOUT), Some(Expired::Head));
    }

    #[test]
    fn a_request_being_served_has_no_deadline() {
        let t0 = Instant::now();
        let c = Clock::new(t0);
        c.request_started();
        assert_eq!(c.deadline(), None);
        assert_eq!(c.expired(t0 + Duration::from_secs(3600)), None);
    }

    #[test]
    fn between_requests_the_idle_timeout_applies_then_a_new_head_gets_its_own() {
        let t0 = Instant::now();
        let c = Clock::new(t0);
        c.request_started();
        let answered = t0 + Duration::from_secs(100);
        c.request_ended(answered);
        assert_eq!(c.expired(answered + HEADER_READ_TIMEOUT * 2), None);
        // The reply still being written keeps it from idling out.
        c.wrote(answered + Duration::from_secs(30));
        assert_eq!(c.expired(answered + IDLE_TIMEOUT), None);
        assert_eq!(
            c.expired(answered + Duration::from_secs(30) + IDLE_TIMEOUT),
            Some(Expired::Idle)
        );
        // The next request's first bytes start its head timer.
        let next = answered + Duration::from_secs(40);
        c.read(next);
        assert_eq!(c.expired(next + HEADER_READ_TIMEOUT), Some(Expired::Head));
    }

    #[test]
    fn pipelined_requests_keep_it_busy_until_the_last_ends() {
        let t0 = Instant::now();
        let c = Clock::new(t0);
        c.request_started();
        c.request_started();
        c.request_ended(t0);
        assert_eq!(c.deadline(), None);
        c.request_ended(t0);
        assert_eq!(c.deadline(), Some((t0 + IDLE_TIMEOUT, Expired::Idle)));
    }
}
