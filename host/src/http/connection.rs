//! Accepting connections and bounding them: how many at once, how long a
//! request head may take, how long a keep-alive connection may sit idle.
//!
//! hyper's own header-read timer starts whenever it waits for a request
//! head, idle keep-alive time included, so it cannot tell a slow head from
//! an idle connection. Each connection here has a [`Clock`] instead, fed by
//! the bytes it reads and writes and by the requests it serves.
//!
//! At `[http] max_connections`, a new connection takes the place of the
//! one that has waited longest for a request head, or sat idle longest
//! ([`Connections::admit`]): connections that never finish their heads
//! cannot lock callers out, however many there are and however fast they
//! come back, since a caller's head arrives at once and its connection is
//! then serving, which is never evicted. Only when every connection serves
//! a request is the new one closed at once.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::http::{HttpCounts, HttpRefusal};

/// How long a keep-alive connection may sit between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request head, and a connection's read buffer.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Why a connection was closed by its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    /// The request head did not arrive in time.
    Head,
    /// Nothing happened for too long between requests.
    Idle,
    /// Its place was given to a new connection.
    Evicted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    /// Serving this many requests.
    Busy(u32),
    /// Between requests.
    Idle,
    /// Evicted while it waited: closing, whatever it does next. Never
    /// left once entered.
    Evicted,
}

/// What one connection is doing, and since when.
#[derive(Debug)]
pub(super) struct Clock {
    state: Mutex<(Phase, Instant)>,
    head_timeout: Duration,
}

impl Clock {
    /// A connection accepted at `now`: its first head is due within
    /// `head_timeout`.
    pub(super) fn new(now: Instant, head_timeout: Duration) -> Self {
        Self {
            state: Mutex::new((Phase::Head, now)),
            head_timeout,
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
                Phase::Evicted => Phase::Evicted,
            };
        });
    }

    /// A request was answered (or abandoned).
    pub(super) fn request_ended(&self, now: Instant) {
        self.with(|s| {
            *s = match s.0 {
                Phase::Busy(n) if n > 1 => (Phase::Busy(n - 1), s.1),
                Phase::Evicted => *s,
                _ => (Phase::Idle, now),
            };
        });
    }

    /// Since when it has waited for a request head or sat idle; `None`
    /// while it serves a request (or is already evicted).
    fn waiting_since(&self) -> Option<Instant> {
        self.with(|s| matches!(s.0, Phase::Head | Phase::Idle).then_some(s.1))
    }

    /// Evicts it at `now` if it still waits for a head or sits idle;
    /// whether it did.
    fn evict(&self, now: Instant) -> bool {
        self.with(|s| {
            let waiting = matches!(s.0, Phase::Head | Phase::Idle);
            if waiting {
                *s = (Phase::Evicted, now);
            }
            waiting
        })
    }

    /// When the connection is due to close if nothing happens, and why;
    /// `None` while it serves a request.
    pub(super) fn deadline(&self) -> Option<(Instant, Expired)> {
        self.with(|s| match s.0 {
            Phase::Head => Some((s.1 + self.head_timeout, Expired::Head)),
            Phase::Idle => Some((s.1 + IDLE_TIMEOUT, Expired::Idle)),
            Phase::Evicted => Some((s.1, Expired::Evicted)),
            Phase::Busy(_) => None,
        })
    }

    /// Why the connection must close at `now`, if it must.
    pub(super) fn expired(&self, now: Instant) -> Option<Expired> {
        self.deadline()
            .and_then(|(at, why)| (now >= at).then_some(why))
    }
}

/// One open connection, as the others see it.
#[derive(Debug)]
pub(super) struct Conn {
    clock: Clock,
    /// Woken when it is evicted.
    evicted: Notify,
}

/// The connections open now: at most `max`, each holding a [`Place`].
#[derive(Debug)]
pub(super) struct Connections {
    max: usize,
    head_timeout: Duration,
    open: Mutex<(u64, HashMap<u64, Arc<Conn>>)>,
    counts: Arc<HttpCounts>,
}

/// A connection's place among the open ones, given back when dropped.
#[derive(Debug)]
pub(super) struct Place {
    connections: Arc<Connections>,
    id: u64,
    conn: Arc<Conn>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.connections.remove(self.id);
    }
}

/// How a new connection got its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admitted {
    /// There was room.
    Free,
    /// The connection that waited longest was evicted for it.
    Evicting,
}

impl Connections {
    /// At most `max` connections, each given `head_timeout` for a head;
    /// their number goes to `counts`.
    pub(super) fn new(max: usize, head_timeout: Duration, counts: Arc<HttpCounts>) -> Arc<Self> {
        Arc::new(Self {
            max,
            head_timeout,
            open: Mutex::default(),
            counts,
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut (u64, HashMap<u64, Arc<Conn>>)) -> R) -> R {
        f(&mut self.open.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A place for a connection accepted at `now`: a free one, or the
    /// place of the connection that has waited longest for a request head
    /// or sat idle longest, which is told to close. `None` when every
    /// connection serves a request.
    pub(super) fn admit(self: &Arc<Self>, now: Instant) -> Option<(Place, Admitted)> {
        self.with(|(next, open)| {
            let mut admitted = Admitted::Free;
            while open.len() >= self.max {
                // The victim's state may change between the look and the
                // eviction (its head completes): then look again.
                let victim = open
                    .iter()
                    .filter_map(|(id, c)| c.clock.waiting_since().map(|t| (t, *id)))
                    .min()?;
                if let Some(conn) = open.get(&victim.1).filter(|c| c.clock.evict(now)) {
                    conn.evicted.notify_one();
                    open.remove(&victim.1);
                    admitted = Admitted::Evicting;
                }
            }
            *next += 1;
            let conn = Arc::new(Conn {
                clock: Clock::new(now, self.head_timeout),
                evicted: Notify::new(),
            });
            open.insert(*next, conn.clone());
            // Under the lock, so that the gauge never goes back in time.
            self.counts.connections(open.len() as u64);
            let place = Place {
                connections: self.clone(),
                id: *next,
                conn,
            };
            Some((place, admitted))
        })
    }

    /// A connection ended (or was evicted and has closed).
    fn remove(&self, id: u64) {
        self.with(|(_, open)| {
            open.remove(&id);
            self.counts.connections(open.len() as u64);
        });
    }
}

/// A socket that tells its connection's [`Clock`] when bytes move.
struct Watched<T> {
    io: T,
    conn: Arc<Conn>,
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
            self.conn.clock.read(Instant::now());
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
            self.conn.clock.wrote(Instant::now());
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
            self.conn.clock.wrote(Instant::now());
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
struct Serving(Arc<Conn>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.clock.request_ended(Instant::now());
    }
}

/// Accepts connections until `stop`, serving each with `app`, as many as
/// `connections` admits: beyond, a new connection is closed at once.
pub(super) async fn accept_loop(
    listener: TcpListener,
    app: Router,
    connections: Arc<Connections>,
    stop: CancellationToken,
) {
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
                crate::throttled!(warn!(
                    error = %e,
                    "HTTP endpoint cannot accept a connection"
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let max_connections = connections.max;
        let place = match connections.admit(Instant::now()) {
            Some((place, Admitted::Free)) => place,
            Some((place, Admitted::Evicting)) => {
                connections.counts.refused(HttpRefusal::Evicted);
                crate::throttled!(warn!(
                    max_connections,
                    "HTTP endpoint at [http] max_connections: closing the connections that \
                     waited longest for a request head (or sat idle longest) to take new ones"
                ));
                place
            }
            None => {
                connections.counts.refused(HttpRefusal::ConnectionsFull);
                crate::throttled!(warn!(
                    max_connections,
                    "HTTP endpoint at [http] max_connections, each serving a request: \
                     closing new connections at once"
                ));
                drop(stream);
                continue;
            }
        };
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(serve_connection(stream, peer, app, stop, place));
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    stop: CancellationToken,
    place: Place,
) {
    // Replies are written whole; do not hold the last segment back.
    let _ = stream.set_nodelay(true);
    let conn = place.conn.clone();
    let io = TokioIo::new(Watched {
        io: stream,
        conn: conn.clone(),
    });
    let tower = TowerToHyperService::new(app);
    let serving = conn.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        serving.clock.request_started();
        let serving = Serving(serving.clone());
        let response = hyper::service::Service::call(&tower, request);
        async move {
            let response = response.await;
            drop(serving);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The clock above times heads; hyper's timer would also cut idle
    // keep-alive connections at the head timeout. A head over
    // MAX_HEAD_BYTES is refused 431, and the read buffer bounds what a
    // connection holds: hyper's 400 KiB would let slow heads hold 400 MiB
    // at max_connections.
    builder
        .header_read_timeout(None)
        .keep_alive(true)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    let served = builder.serve_connection(io, service);
    let mut served = std::pin::pin!(served);
    let mut stopping = false;
    loop {
        let due = conn.clock.deadline();
        let wake = due.map_or_else(
            // Serving a request: look again later.
            || tokio::time::Instant::now() + Duration::from_secs(1),
            |(at, _)| tokio::time::Instant::from_std(at),
        );
        tokio::select! {
            ended = served.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                break;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                served.as_mut().graceful_shutdown();
            }
            () = conn.evicted.notified() => {
                tracing::debug!(%peer, "HTTP connection evicted for a new one");
                break;
            }
            () = tokio::time::sleep_until(wake) => {
                match conn.clock.expired(Instant::now()) {
                    None => {}
                    Some(why) => {
                        if why == Expired::Head {
                            place.connections.counts.refused(HttpRefusal::HeadTimeout);
                            crate::throttled!(info!(
                                timeout = ?place.connections.head_timeout,
                                "HTTP connections closed: their request head did not arrive \
                                 within [http] header_timeout"
                            ));
                        }
                        tracing::debug!(%peer, ?why, "HTTP connection closed by its timer");
                        break;
                    }
                }
            }
        }
    }
    // The locals, the socket among them, are dropped before `place`, a
    // parameter: the descriptor is closed by the time the place is free.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_HTTP_HEADER_TIMEOUT as HEADER_READ_TIMEOUT;

    #[test]
    fn a_new_connection_must_send_its_head_in_time() {
        let t0 = Instant::now();
        let c = Clock::new(t0, HEADER_READ_TIMEOUT);
        assert_eq!(c.expired(t0 + HEADER_READ_TIMEOUT / 2), None);
        // Bytes of the head do not extend its deadline.
        c.read(t0 + Duration::from_secs(9));
        assert_eq!(c.expired(t0 + HEADER_READ_TIMEOUT), Some(Expired::Head));
    }

    #[test]
    fn a_request_being_served_has_no_deadline() {
        let t0 = Instant::now();
        let c = Clock::new(t0, HEADER_READ_TIMEOUT);
        c.request_started();
        assert_eq!(c.deadline(), None);
        assert_eq!(c.expired(t0 + Duration::from_secs(3600)), None);
    }

    #[test]
    fn between_requests_the_idle_timeout_applies_then_a_new_head_gets_its_own() {
        let t0 = Instant::now();
        let c = Clock::new(t0, HEADER_READ_TIMEOUT);
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
        let c = Clock::new(t0, HEADER_READ_TIMEOUT);
        c.request_started();
        c.request_started();
        c.request_ended(t0);
        assert_eq!(c.deadline(), None);
        c.request_ended(t0);
        assert_eq!(c.deadline(), Some((t0 + IDLE_TIMEOUT, Expired::Idle)));
    }

    fn connections(max: usize) -> Arc<Connections> {
        Connections::new(max, HEADER_READ_TIMEOUT, Arc::default())
    }

    #[test]
    fn a_connection_evicted_while_waiting_stays_evicted() {
        let t0 = Instant::now();
        let c = Clock::new(t0, HEADER_READ_TIMEOUT);
        assert_eq!(c.waiting_since(), Some(t0));
        assert!(c.evict(t0));
        assert_eq!(c.expired(t0), Some(Expired::Evicted));
        // A head completing just after changes nothing.
        c.request_started();
        c.request_ended(t0);
        assert_eq!(c.expired(t0), Some(Expired::Evicted));
        assert!(!c.evict(t0), "evicted once");
        let busy = Clock::new(t0, HEADER_READ_TIMEOUT);
        busy.request_started();
        assert_eq!(busy.waiting_since(), None);
        assert!(!busy.evict(t0), "a request being served is never evicted");
    }

    #[test]
    fn when_full_the_connection_waiting_longest_makes_room() {
        let open = connections(3);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (oldest, how) = open.admit(at(0)).unwrap();
        assert_eq!(how, Admitted::Free);
        let (serving, _) = open.admit(at(1)).unwrap();
        let (idle, _) = open.admit(at(2)).unwrap();
        // The oldest connection is serving; the second one waits; the
        // third was answered and sits idle since 5 ms.
        oldest.conn.clock.request_started();
        idle.conn.clock.request_started();
        idle.conn.clock.request_ended(at(5));
        serving.conn.clock.read(at(3));

        let (fourth, how) = open.admit(at(10)).unwrap();
        assert_eq!(how, Admitted::Evicting);
        assert_eq!(serving.conn.clock.expired(at(10)), Some(Expired::Evicted));
        assert_eq!(idle.conn.clock.expired(at(10)), None);
        assert_eq!(oldest.conn.clock.deadline(), None);

        // Then the idle one, waiting since 5 ms, before the new one.
        let (_fifth, how) = open.admit(at(11)).unwrap();
        assert_eq!(how, Admitted::Evicting);
        assert_eq!(idle.conn.clock.expired(at(11)), Some(Expired::Evicted));
        assert_eq!(fourth.conn.clock.expired(at(11)), None);
    }

    #[test]
    fn when_every_connection_serves_a_request_a_new_one_is_refused() {
        let open = connections(2);
        let t0 = Instant::now();
        let places: Vec<Place> = (0..2).map(|_| open.admit(t0).unwrap().0).collect();
        for p in &places {
            p.conn.clock.request_started();
        }
        assert!(open.admit(t0).is_none());
        // A place given back is free again.
        drop(places);
        assert_eq!(open.admit(t0).map(|(_, how)| how), Some(Admitted::Free));
    }

    #[test]
    fn an_evicted_connection_gives_back_nothing_twice() {
        let open = connections(1);
        let t0 = Instant::now();
        let (first, _) = open.admit(t0).unwrap();
        let (second, how) = open.admit(t0).unwrap();
        assert_eq!(how, Admitted::Evicting);
        // The evicted connection closes after its replacement came in: its
        // place is already taken, and stays with the second.
        drop(first);
        second.conn.clock.request_started();
        assert!(open.admit(t0).is_none());
    }
}
