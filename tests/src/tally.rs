//! What became of each request of a test, counted per request id: the
//! one place where "loses nothing" and "answered once" are decided.
//!
//! A test records what it sent and every reply it got (duplicates
//! included), then [`Tally::judge`]s them: each first answer is either one
//! of the outcomes the test accepts (named, counted apart: "result",
//! "refused: max_bus_waits", …) or wrong. The [`Counts`] print every number
//! and assert only what the test's name promises, each failure showing
//! all the numbers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Debug, Display};

use serde_json::Value;

/// Requests and their replies, by request id.
#[derive(Debug, Clone)]
pub struct Tally<K: Ord = usize> {
    /// How many requests the test meant to send.
    requests: usize,
    /// Sent: known to have reached the bus (confirmed, or pushed).
    sent: BTreeSet<K>,
    /// Published without a confirmation (the connection went first): they
    /// may or may not have reached the queue.
    unconfirmed: BTreeSet<K>,
    /// Every reply, in arrival order, per id.
    replies: BTreeMap<K, Vec<Value>>,
    /// Replies the broker delivered again (the caller's channel closed
    /// before its ack): the same reply, not a second answer.
    redelivered: usize,
}

impl<K: Ord + Clone + Debug> Tally<K> {
    /// A tally of a test that means to send `requests` requests.
    pub fn new(requests: usize) -> Self {
        Self {
            requests,
            sent: BTreeSet::new(),
            unconfirmed: BTreeSet::new(),
            replies: BTreeMap::new(),
            redelivered: 0,
        }
    }

    /// Request `id` reached the bus.
    pub fn sent(&mut self, id: K) {
        self.unconfirmed.remove(&id);
        self.sent.insert(id);
    }

    /// Request `id` was published, but whether it reached the bus is not
    /// known.
    pub fn unconfirmed(&mut self, id: K) {
        if !self.sent.contains(&id) {
            self.unconfirmed.insert(id);
        }
    }

    /// A reply to `id` arrived; `again`: the broker delivered this very
    /// reply before (not a second answer of the service). An answer
    /// proves its request reached the bus.
    pub fn reply(&mut self, id: K, reply: Value, again: bool) {
        if again && self.replies.contains_key(&id) {
            self.redelivered += 1;
            return;
        }
        self.sent(id.clone());
        self.replies.entry(id).or_default().push(reply);
    }

    /// Whether `id` has an answer.
    pub fn is_answered(&self, id: &K) -> bool {
        self.replies.contains_key(id)
    }

    /// Distinct requests answered so far.
    pub fn answered(&self) -> usize {
        self.replies.len()
    }

    /// The first reply to `id`.
    pub fn first_reply(&self, id: &K) -> Option<&Value> {
        self.replies.get(id).and_then(|r| r.first())
    }

    /// Every first reply, by id.
    pub fn first_replies(&self) -> impl Iterator<Item = (&K, &Value)> {
        self.replies
            .iter()
            .filter_map(|(id, r)| r.first().map(|v| (id, v)))
    }

    /// Sent requests without an answer, in order.
    pub fn unanswered(&self) -> Vec<K> {
        self.sent
            .iter()
            .filter(|id| !self.replies.contains_key(*id))
            .cloned()
            .collect()
    }

    /// Requests known sent.
    pub fn sent_count(&self) -> usize {
        self.sent.len()
    }

    /// Requests published without a confirmation, and never answered.
    pub fn unconfirmed_count(&self) -> usize {
        self.unconfirmed.len()
    }

    /// Replies beyond the first for a request.
    pub fn extra_replies(&self) -> usize {
        self.replies.values().map(|r| r.len() - 1).sum()
    }

    /// Counts every request: `judge(id, reply)` names the outcome of an
    /// answer the test accepts (`"result"`, `"refused"`, …), `None` for a
    /// wrong one. `what` names the run in the printed numbers, which are
    /// printed at once.
    pub fn judge(
        &self,
        what: &str,
        judge: impl Fn(&K, &Value) -> Option<&'static str>,
    ) -> Counts<K> {
        let mut counts = Counts {
            what: what.to_owned(),
            requests: self.requests,
            sent: self.sent.len(),
            unconfirmed: self.unconfirmed.len(),
            unsent: 0,
            answered: self.replies.len(),
            outcomes: BTreeMap::new(),
            errors: 0,
            wrong: Vec::new(),
            duplicated: 0,
            extra_replies: 0,
            wrong_duplicates: Vec::new(),
            redelivered: self.redelivered,
            unanswered: self.unanswered(),
            strangers: 0,
            context: String::new(),
        };
        let known = self.sent.len() + self.unconfirmed.len();
        counts.unsent = self.requests.saturating_sub(known);
        counts.strangers = known.saturating_sub(self.requests);
        for (id, replies) in &self.replies {
            let Some((first, again)) = replies.split_first() else {
                continue;
            };
            if first.get("error").is_some() {
                counts.errors += 1;
            }
            match judge(id, first) {
                Some(outcome) => *counts.outcomes.entry(outcome).or_default() += 1,
                None => counts.wrong.push((id.clone(), first.clone())),
            }
            if !again.is_empty() {
                counts.duplicated += 1;
                counts.extra_replies += again.len();
            }
            for reply in again {
                if judge(id, reply).is_none() {
                    counts.wrong_duplicates.push((id.clone(), reply.clone()));
                }
            }
        }
        eprintln!("{counts}");
        counts
    }
}

/// What became of a test's requests (see [`Tally::judge`]).
#[derive(Debug, Clone)]
pub struct Counts<K> {
    /// The run, as printed.
    pub what: String,
    /// Requests the test meant to send.
    pub requests: usize,
    /// Known to have reached the bus.
    pub sent: usize,
    /// Published unconfirmed and never answered.
    pub unconfirmed: usize,
    /// Never published (the run ended first).
    pub unsent: usize,
    /// Distinct requests answered.
    pub answered: usize,
    /// First answers the test accepts, by outcome.
    pub outcomes: BTreeMap<&'static str, usize>,
    /// First answers that are JSON-RPC errors (accepted or not).
    pub errors: usize,
    /// First answers the test does not accept.
    pub wrong: Vec<(K, Value)>,
    /// Requests answered more than once.
    pub duplicated: usize,
    /// Replies beyond the first.
    pub extra_replies: usize,
    /// Later answers the test does not accept.
    pub wrong_duplicates: Vec<(K, Value)>,
    /// The same reply delivered again by the broker (not counted as an
    /// answer).
    pub redelivered: usize,
    /// Sent, never answered.
    pub unanswered: Vec<K>,
    /// More ids sent than the test meant to send.
    pub strangers: usize,
    /// Shown with a failure (the host's log).
    context: String,
}

impl<K: Debug> Display for Counts<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcomes = self
            .outcomes
            .iter()
            .map(|(o, n)| format!("{n} {o}"))
            .collect::<Vec<_>>()
            .join(", ");
        write!(
            f,
            "{}: {} requests: {} sent, {} unconfirmed, {} unsent; {} answered ({outcomes}; \
             {} errors, {} wrong); {} duplicated ({} extra replies, {} wrong; {} redelivered \
             by the broker); {} unanswered",
            self.what,
            self.requests,
            self.sent,
            self.unconfirmed,
            self.unsent,
            self.answered,
            self.errors,
            self.wrong.len(),
            self.duplicated,
            self.extra_replies,
            self.wrong_duplicates.len(),
            self.redelivered,
            self.unanswered.len(),
        )?;
        if self.strangers > 0 {
            write!(f, "; {} ids beyond those meant", self.strangers)?;
        }
        if !self.wrong.is_empty() {
            write!(
                f,
                "\n  wrong: {:?}",
                &self.wrong[..self.wrong.len().min(10)]
            )?;
        }
        if !self.wrong_duplicates.is_empty() {
            let n = self.wrong_duplicates.len().min(10);
            write!(f, "\n  wrong duplicates: {:?}", &self.wrong_duplicates[..n])?;
        }
        if !self.unanswered.is_empty() {
            let n = self.unanswered.len().min(20);
            write!(f, "\n  unanswered: {:?}", &self.unanswered[..n])?;
        }
        Ok(())
    }
}

impl<K: Debug> Counts<K> {
    /// Shows `context` (the host's log) with any failure.
    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.context = context.into();
        self
    }

    fn check(&self, ok: bool, promise: &str) -> &Self {
        assert!(ok, "{promise}: {self}\n{}", self.context);
        self
    }

    /// Every answer (the later ones too) one the test accepts.
    pub fn answers_as_expected(&self) -> &Self {
        self.check(self.wrong.is_empty(), "every answer as expected")
            .check(
                self.wrong_duplicates.is_empty(),
                "every later answer as expected",
            )
    }

    /// Nothing lost: every request was sent (none unsent, none left
    /// unconfirmed), every one sent answered, and every answer (the later
    /// ones too) one the test accepts.
    pub fn lost_none(&self) -> &Self {
        self.check(self.unsent == 0, "every request sent")
            .check(self.strangers == 0, "no ids beyond those meant")
            .check(self.unanswered.is_empty(), "every request sent answered")
            .check(self.wrong.is_empty(), "every answer as expected")
            .check(
                self.wrong_duplicates.is_empty(),
                "every later answer as expected",
            )
    }

    /// Answered exactly once: nothing lost, none unconfirmed, no
    /// duplicate.
    pub fn each_answered_once(&self) -> &Self {
        self.lost_none()
            .check(self.unconfirmed == 0, "every request confirmed")
            .check(self.duplicated == 0, "no request answered twice")
    }

    /// At most `n` requests answered more than once (at-least-once
    /// delivery: `why` says what may answer twice).
    pub fn duplicated_at_most(&self, n: usize, why: &str) -> &Self {
        self.check(
            self.duplicated <= n,
            &format!("at most {n} requests answered twice ({why})"),
        )
    }

    /// At most `n` requests unconfirmed (`why`: what may leave a publish
    /// unconfirmed).
    pub fn unconfirmed_at_most(&self, n: usize, why: &str) -> &Self {
        self.check(
            self.unconfirmed <= n,
            &format!("at most {n} requests unconfirmed ({why})"),
        )
    }

    /// No answer is a JSON-RPC error, unless the test accepted it by name.
    pub fn errors_exactly(&self, n: usize) -> &Self {
        self.check(self.errors == n, &format!("{n} error answers"))
    }

    /// How many first answers had `outcome`.
    pub fn outcome(&self, outcome: &str) -> usize {
        self.outcomes.get(outcome).copied().unwrap_or(0)
    }

    /// Exactly `n` first answers had `outcome`.
    pub fn outcome_exactly(&self, outcome: &str, n: usize) -> &Self {
        let got = self.outcome(outcome);
        self.check(got == n, &format!("{n} answers {outcome}, not {got}"))
    }

    /// At least `n` first answers had `outcome`.
    pub fn outcome_at_least(&self, outcome: &str, n: usize) -> &Self {
        let got = self.outcome(outcome);
        self.check(
            got >= n,
            &format!("at least {n} answers {outcome}, not {got}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn add(_: &usize, reply: &Value) -> Option<&'static str> {
        (reply["result"] == 1).then_some("result")
    }

    fn all_answered() -> Tally {
        let mut t = Tally::new(3);
        for i in 0..3 {
            t.sent(i);
            t.reply(i, json!({"result": 1}), false);
        }
        t
    }

    #[test]
    fn each_answered_once_holds_when_it_should() {
        all_answered().judge("ok", add).each_answered_once();
    }

    #[test]
    #[should_panic(expected = "no request answered twice")]
    fn a_duplicate_fails_answered_once() {
        let mut t = all_answered();
        t.reply(1, json!({"result": 1}), false);
        let counts = t.judge("dup", add);
        assert_eq!((counts.duplicated, counts.extra_replies), (1, 1));
        counts.each_answered_once();
    }

    #[test]
    fn a_redelivered_reply_is_no_duplicate() {
        let mut t = all_answered();
        t.reply(1, json!({"result": 1}), true);
        t.judge("again", add).each_answered_once();
    }

    #[test]
    #[should_panic(expected = "every answer as expected")]
    fn an_error_answer_is_no_answer_as_expected() {
        let mut t = Tally::new(2);
        t.sent(0);
        t.sent(1);
        t.reply(0, json!({"result": 1}), false);
        t.reply(1, json!({"error": {"code": -32603}}), false);
        let counts = t.judge("error", add);
        assert_eq!((counts.errors, counts.wrong.len()), (1, 1));
        counts.lost_none();
    }

    #[test]
    #[should_panic(expected = "every request sent answered")]
    fn an_unanswered_request_is_lost() {
        let mut t = all_answered();
        t.requests = 4;
        t.sent(3);
        t.judge("lost", add).lost_none();
    }

    #[test]
    #[should_panic(expected = "every request sent")]
    fn a_request_never_sent_is_lost() {
        let mut t = all_answered();
        t.requests = 4;
        t.judge("unsent", add).lost_none();
    }

    #[test]
    #[should_panic(expected = "every later answer as expected")]
    fn a_wrong_duplicate_is_caught() {
        let mut t = all_answered();
        t.reply(2, json!({"error": {"code": -32603}}), false);
        t.judge("wrong dup", add).lost_none();
    }

    #[test]
    fn an_unconfirmed_request_answered_counts_as_sent() {
        let mut t = Tally::new(1);
        t.unconfirmed(0);
        assert_eq!(t.unconfirmed_count(), 1);
        t.reply(0, json!({"result": 1}), false);
        let counts = t.judge("late", add);
        assert_eq!((counts.sent, counts.unconfirmed), (1, 0));
        counts.each_answered_once();
    }
}
