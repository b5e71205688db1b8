//! Coalesced acks for one AMQP channel: one `basic.ack multiple=true`
//! settles a run of requests instead of one frame (and one broker
//! operation) each.
//!
//! A `multiple` ack of tag T settles every delivery of the channel up to T
//! that the broker still holds unacked, so T must be chosen such that none
//! of them is still being handled, or about to be handed back with a nack:
//! [`AckBook`] acks only up to the highest *contiguous* settled tag (tags
//! of a channel count up from 1 without gaps), and a nack is sent at once,
//! before its tag counts as settled. A tag the book never heard of blocks
//! the run like one still being handled.
//!
//! An ack waits at most about the window: acks go out when a batch waits
//! (half the consumer's prefetch, at most [`MAX_BATCH`]: waiting acks hold
//! prefetch slots), or when the oldest has waited the window. Not sooner when the
//! channel is idle: a fast host settles each delivery before the next
//! arrives, and flushing then would send every ack on its own. The wait
//! delays no reply (each went out before its ack was recorded) and no
//! delivery while the prefetch has room. One stuck behind a delivery that
//! stays unsettled is sent on its own once it has waited the window.
//! Shutting down sends all that wait.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use tokio_util::sync::CancellationToken;

use super::BusError;

/// The most acks waiting before they are sent without waiting for the
/// window.
pub const MAX_BATCH: usize = 32;

/// Settled tags the book keeps above a delivery that stays unsettled
/// before it gives up coalescing on that channel (every ack then goes out
/// on its own, as with `ack_window_us = 0`).
pub const MAX_TRACKED: usize = 4096;

/// One `basic.ack` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckFrame {
    /// The delivery tag.
    pub tag: u64,
    /// Whether it settles every unacked tag up to `tag`.
    pub multiple: bool,
}

/// What the settler of an ack does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Flush now: a batch is full.
    Flush,
    /// Leave it to the timer.
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Acked by its handler, not sent yet; since when.
    Ack(Instant),
    /// Its frame is sent (a nack, or an ack on its own): it only fills the
    /// run for a later `multiple` ack.
    Sent,
}

/// Which tags of a channel are settled and which acks wait: the logic of
/// coalescing, without I/O.
#[derive(Debug)]
pub struct AckBook {
    window: Duration,
    batch: usize,
    /// Every tag up to here is settled on the broker, or covered by an ack
    /// already sent.
    base: u64,
    /// Settled tags above `base`.
    settled: BTreeMap<u64, Settled>,
    /// Acks waiting in `settled`.
    waiting: usize,
    /// Too many tags kept above a delivery that stays unsettled: every ack
    /// goes out on its own.
    degraded: bool,
}

impl AckBook {
    /// A book for a new channel whose consumer holds at most `prefetch`
    /// deliveries; acks wait at most about `window`.
    pub fn new(window: Duration, prefetch: u16) -> Self {
        Self {
            window,
            batch: usize::from(prefetch / 2).clamp(1, MAX_BATCH),
            base: 0,
            settled: BTreeMap::new(),
            waiting: 0,
            degraded: false,
        }
    }

    /// `tag` is acked by its handler, at `now`.
    pub fn acked(&mut self, tag: u64, now: Instant) -> Next {
        if tag <= self.base {
            return Next::Wait;
        }
        self.settled.insert(tag, Settled::Ack(now));
        self.waiting += 1;
        if self.degraded || self.waiting >= self.batch {
            Next::Flush
        } else {
            Next::Wait
        }
    }

    /// `tag`'s nack (or reject) has been sent: it fills the run of a later
    /// `multiple` ack, which no longer covers it on the broker.
    pub fn nacked(&mut self, tag: u64) {
        if tag > self.base && !self.degraded {
            self.settled.insert(tag, Settled::Sent);
        }
    }

    /// The acks to send now, and the book updated as if they were: one
    /// `multiple` ack for the contiguous run from `base`, then on their
    /// own the acks stuck behind a gap that have waited the window (all of
    /// them if `all`).
    pub fn plan(&mut self, now: Instant, all: bool) -> Vec<AckFrame> {
        let mut frames = Vec::new();
        if self.degraded {
            for (tag, _) in std::mem::take(&mut self.settled) {
                frames.push(AckFrame {
                    tag,
                    multiple: false,
                });
            }
            self.waiting = 0;
            return frames;
        }
        // The contiguous run.
        let (mut last_ack, mut acks) = (None, 0);
        while let Some(settled) = self.settled.remove(&(self.base + 1)) {
            self.base += 1;
            if let Settled::Ack(_) = settled {
                last_ack = Some(self.base);
                acks += 1;
            }
        }
        if let Some(tag) = last_ack {
            frames.push(AckFrame {
                tag,
                multiple: acks > 1,
            });
            self.waiting -= acks;
        }
        // Past a gap: on their own, once they have waited long enough.
        for (&tag, settled) in &mut self.settled {
            if let Settled::Ack(since) = *settled {
                if all || now.saturating_duration_since(since) >= self.window {
                    frames.push(AckFrame {
                        tag,
                        multiple: false,
                    });
                    *settled = Settled::Sent;
                    self.waiting -= 1;
                }
            }
        }
        if self.settled.len() > MAX_TRACKED {
            tracing::warn!(
                tracked = self.settled.len(),
                first_unsettled = self.base + 1,
                "a delivery stays unsettled: acking each request on its own on this channel"
            );
            self.degraded = true;
            self.settled.retain(|_, s| matches!(s, Settled::Ack(_)));
        }
        frames
    }

    /// When the oldest waiting ack has waited the window.
    pub fn deadline(&self) -> Option<Instant> {
        self.settled
            .values()
            .filter_map(|s| match s {
                Settled::Ack(since) => Some(*since + self.window),
                Settled::Sent => None,
            })
            .min()
    }

    /// How many acks wait.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting
    }
}

/// The acks of one channel: [`AckBook`] and the frames it plans.
pub struct AckBatcher {
    channel: Channel,
    book: Mutex<AckBook>,
    /// Held while frames are sent, so that a flush plans and sends in the
    /// order the broker must see (a nack before the `multiple` ack whose
    /// run it fills).
    order: tokio::sync::Mutex<()>,
    wake: Arc<tokio::sync::Notify>,
    done: CancellationToken,
}

impl std::fmt::Debug for AckBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckBatcher")
            .field("channel", &self.channel.id())
            .finish_non_exhaustive()
    }
}

impl Drop for AckBatcher {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

impl AckBatcher {
    /// Coalesces the acks of `channel` (whose consumer holds at most
    /// `prefetch` deliveries) over `window`, with a timer task that lives
    /// as long as the batcher.
    pub fn new(channel: Channel, window: Duration, prefetch: u16) -> Arc<Self> {
        let batcher = Arc::new(Self {
            channel,
            book: Mutex::new(AckBook::new(window, prefetch)),
            order: tokio::sync::Mutex::new(()),
            wake: Arc::new(tokio::sync::Notify::new()),
            done: CancellationToken::new(),
        });
        let (weak, wake, done) = (
            Arc::downgrade(&batcher),
            batcher.wake.clone(),
            batcher.done.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = done.cancelled() => return,
                    () = wake.notified() => {}
                }
                while let Some(deadline) = weak.upgrade().and_then(|b| b.book().deadline()) {
                    tokio::select! {
                        () = done.cancelled() => return,
                        () = tokio::time::sleep_until(deadline.into()) => {}
                    }
                    match weak.upgrade() {
                        Some(batcher) => batcher.flush(false).await,
                        None => return,
                    }
                }
            }
        });
        batcher
    }

    fn book(&self) -> std::sync::MutexGuard<'_, AckBook> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Acks `tag`: now, or with others within the window.
    pub async fn ack(&self, tag: u64) {
        let next = self.book().acked(tag, Instant::now());
        match next {
            Next::Flush => self.flush(false).await,
            Next::Wait => self.wake.notify_one(),
        }
    }

    /// Hands `tag` back to its queue, at once.
    pub async fn requeue(&self, tag: u64) -> Result<(), BusError> {
        let _order = self.order.lock().await;
        let sent = self
            .channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    requeue: true,
                    multiple: false,
                },
            )
            .await;
        self.book().nacked(tag);
        sent.map_err(|e| BusError::lost("basic.nack", e))
    }

    /// Sends the acks that are due (every waiting one if `all`).
    pub async fn flush(&self, all: bool) {
        let _order = self.order.lock().await;
        let frames = self.book().plan(Instant::now(), all);
        for frame in frames {
            let options = BasicAckOptions {
                multiple: frame.multiple,
            };
            if let Err(e) = self.channel.basic_ack(frame.tag, options).await {
                // The channel is gone: the broker delivers its unacked
                // requests again, answered or not.
                tracing::warn!(
                    channel = self.channel.id(), delivery_tag = frame.tag,
                    multiple = frame.multiple, error = %e,
                    "acks not sent; those requests may be delivered again"
                );
                return;
            }
        }
    }
}

#[cfg(test)]
#[path = "acks_tests.rs"]
mod tests;
