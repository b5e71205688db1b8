//! The tag logic of coalesced acks, without a broker.

use super::*;

const WINDOW: Duration = Duration::from_millis(1);

fn single(tag: u64) -> AckFrame {
    AckFrame {
        tag,
        multiple: false,
    }
}

fn multiple(tag: u64) -> AckFrame {
    AckFrame {
        tag,
        multiple: true,
    }
}

fn book() -> AckBook {
    AckBook::new(WINDOW, 64)
}

#[test]
fn a_lone_ack_goes_out_when_the_timer_flushes() {
    let mut b = book();
    let t = Instant::now();
    assert_eq!(b.acked(1, t), Next::Wait);
    assert_eq!(b.deadline(), Some(t + WINDOW));
    assert_eq!(b.plan(t + WINDOW, false), vec![single(1)]);
    assert_eq!(b.waiting(), 0);
    assert_eq!(b.deadline(), None);
}

#[test]
fn acks_settled_out_of_order_go_out_as_one_multiple_ack_of_the_highest() {
    let mut b = book();
    let t = Instant::now();
    assert_eq!(b.acked(3, t), Next::Wait);
    assert_eq!(b.acked(2, t), Next::Wait);
    assert_eq!(b.acked(4, t), Next::Wait);
    // 1 is still being handled: nothing may cover it.
    assert_eq!(b.plan(t, false), vec![]);
    assert_eq!(b.acked(1, t), Next::Wait);
    assert_eq!(b.plan(t, false), vec![multiple(4)]);
    assert_eq!(b.waiting(), 0);
}

#[test]
fn the_run_stops_below_a_delivery_still_being_handled() {
    let mut b = book();
    let t = Instant::now();
    for tag in [1, 2, 4, 5] {
        b.acked(tag, t);
    }
    assert_eq!(b.plan(t, false), vec![multiple(2)]);
    assert_eq!(b.waiting(), 2);
    b.acked(3, t);
    assert_eq!(b.plan(t, false), vec![multiple(5)]);
}

#[test]
fn a_nack_inside_the_window_is_never_covered_before_it_is_sent() {
    let mut b = book();
    let t = Instant::now();
    b.acked(1, t);
    b.acked(3, t);
    b.acked(4, t);
    // 2 is about to be requeued: until its nack is sent it is a gap.
    assert_eq!(b.plan(t, false), vec![single(1)]);
    b.nacked(2);
    // Now the broker no longer holds 2 unacked: a multiple ack of 4
    // covers 3 and 4 only.
    assert_eq!(b.plan(t, false), vec![multiple(4)]);
}

#[test]
fn a_run_ending_on_a_nack_acks_its_highest_ack() {
    let mut b = book();
    let t = Instant::now();
    b.acked(1, t);
    b.acked(2, t);
    b.nacked(3);
    // The named tag must itself be unacked on the broker: 2, not 3.
    assert_eq!(b.plan(t, false), vec![multiple(2)]);
    assert_eq!(b.plan(t, false), vec![]);
}

#[test]
fn a_tag_never_heard_of_blocks_the_run() {
    // Tag 1 was delivered but its delivery is not handled yet (e.g. still
    // in a cancelled consumer's stream): 2 must not cover it.
    let mut b = book();
    let t = Instant::now();
    assert_eq!(b.acked(2, t), Next::Wait);
    assert_eq!(b.plan(t, false), vec![]);
    assert_eq!(b.plan(t + WINDOW, false), vec![single(2)]);
    b.acked(1, t);
    assert_eq!(b.plan(t, false), vec![single(1)]);
}

#[test]
fn the_timer_sends_acks_stuck_behind_a_gap_on_their_own() {
    let mut b = book();
    let t = Instant::now();
    b.acked(2, t);
    b.acked(3, t + WINDOW / 2);
    assert_eq!(b.deadline(), Some(t + WINDOW));
    assert_eq!(b.plan(t + WINDOW / 4, false), vec![]);
    assert_eq!(b.plan(t + WINDOW, false), vec![single(2)]);
    assert_eq!(b.deadline(), Some(t + WINDOW / 2 + WINDOW));
    assert_eq!(b.plan(t + 2 * WINDOW, false), vec![single(3)]);
    assert_eq!(b.deadline(), None);
    // Once the gap settles, the run goes through what was sent on its own
    // and there is nothing left to send.
    assert_eq!(b.acked(1, t), Next::Wait);
    assert_eq!(b.plan(t, false), vec![single(1)]);
    b.acked(4, t);
    assert_eq!(b.plan(t, false), vec![single(4)]);
}

#[test]
fn a_full_batch_flushes_without_waiting_for_the_timer() {
    let mut b = book();
    let t = Instant::now();
    for tag in 1..MAX_BATCH as u64 {
        assert_eq!(b.acked(tag, t), Next::Wait);
    }
    assert_eq!(b.acked(MAX_BATCH as u64, t), Next::Flush);
    assert_eq!(b.plan(t, false), vec![multiple(MAX_BATCH as u64)]);
}

#[test]
fn a_small_prefetch_makes_small_batches() {
    let mut b = AckBook::new(WINDOW, 4);
    let t = Instant::now();
    assert_eq!(b.acked(1, t), Next::Wait);
    assert_eq!(b.acked(2, t), Next::Flush);
    assert_eq!(b.plan(t, false), vec![multiple(2)]);
    let mut one = AckBook::new(WINDOW, 1);
    assert_eq!(one.acked(1, t), Next::Flush);
}

#[test]
fn shutdown_sends_every_waiting_ack() {
    let mut b = book();
    let t = Instant::now();
    b.acked(1, t);
    b.acked(2, t);
    b.acked(4, t);
    assert_eq!(b.plan(t, true), vec![multiple(2), single(4)]);
    assert_eq!(b.waiting(), 0);
    assert_eq!(b.plan(t, true), vec![]);
}

#[test]
fn a_delivery_that_stays_unsettled_ends_coalescing_on_its_channel() {
    let mut b = book();
    let t = Instant::now();
    // 1 never settles.
    for tag in 2..=(MAX_TRACKED as u64 + 2) {
        b.acked(tag, t);
    }
    let sent = b.plan(t + WINDOW, false);
    assert_eq!(sent.len(), MAX_TRACKED + 1);
    assert!(sent.iter().all(|f| !f.multiple));
    // From now on each ack goes out at once, on its own; the stuck one
    // is still never covered.
    assert_eq!(b.acked(MAX_TRACKED as u64 + 3, t), Next::Flush);
    assert_eq!(b.plan(t, false), vec![single(MAX_TRACKED as u64 + 3)]);
}
