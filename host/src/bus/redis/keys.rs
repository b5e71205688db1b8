//! The names kombu gives things in Redis: binding sets and their members,
//! priority lists, the unacked hash, index and lock.

use crate::bus::topic;

/// kombu's separator inside binding members and priority queue names.
pub const SEP: &str = "\x06\x16";
/// kombu's priority steps: one list per step, consumed in this order.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
/// The hash of unacked deliveries.
pub const UNACKED: &str = "unacked";
/// The sorted set of unacked delivery tags, scored by delivery time.
pub const UNACKED_INDEX: &str = "unacked_index";
/// The lock held while restoring.
pub const UNACKED_MUTEX: &str = "unacked_mutex";

/// The prefix of the sets naming what each consumer holds.
pub const HELD_PREFIX: &str = "commissaire-host.held.";

/// The set of the tags consumer `owner` took and has not settled: what is
/// handed back when it dies, without waiting for the visibility timeout.
pub fn held_key(owner: &str) -> String {
    format!("{HELD_PREFIX}{owner}")
}

/// The held set a tag of ours (`<owner>.<connection>.<n>`) is in; `None`
/// for kombu's tags (uuids).
pub(super) fn held_key_of_tag(tag: &str) -> Option<String> {
    let (owner, rest) = tag.split_once('.')?;
    rest.contains('.').then(|| held_key(owner))
}

/// Whether `owner` can name a consumer: letters, digits, `-` and `_`.
pub(super) fn valid_owner(owner: &str) -> bool {
    !owner.is_empty()
        && owner.len() <= 64
        && owner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Why a queue may not be named `name` (the transport's own keys), as the
/// scripts' `refusal` says for names alone.
pub(super) fn reserved(name: &str) -> Option<&'static str> {
    if [UNACKED, UNACKED_INDEX, UNACKED_MUTEX].contains(&name) {
        Some("it is the transport's own key")
    } else if name.starts_with("_kombu.") {
        Some("kombu's binding tables start with `_kombu.`")
    } else if name.starts_with(HELD_PREFIX) {
        Some("it names a consumer's held set")
    } else {
        None
    }
}

/// The set holding the bindings of `exchange`.
pub fn binding_key(exchange: &str) -> String {
    format!("_kombu.binding.{exchange}")
}

/// The set of bindings kombu ≥ 5.6 must never sweep.
pub fn binding_permanent_key(exchange: &str) -> String {
    format!("_kombu.binding_permanent.{exchange}")
}

/// The list holding `queue`'s messages of priority step `step`.
pub fn priority_list(queue: &str, step: u8) -> String {
    if step == 0 {
        queue.to_owned()
    } else {
        format!("{queue}{SEP}{step}")
    }
}

/// Every list of `queue`, in `BRPOP` order.
pub fn queue_lists(queue: &str) -> Vec<String> {
    PRIORITY_STEPS
        .iter()
        .map(|step| priority_list(queue, *step))
        .collect()
}

/// The queue a list belongs to (the list name less its priority suffix).
pub(super) fn queue_of_list(list: &str) -> &str {
    list.rsplit_once(SEP).map_or(list, |(q, _)| q)
}

/// The step of a message priority, as kombu's `Channel.priority` (clamped
/// to 0..=9, rounded down to a step).
pub(super) fn priority_step(priority: i64) -> u8 {
    let p = u8::try_from(priority.clamp(0, 9)).unwrap_or(0);
    PRIORITY_STEPS
        .iter()
        .copied()
        .filter(|step| *step <= p)
        .max()
        .unwrap_or(0)
}

/// The binding member kombu's topic exchange stores: routing key, the regex
/// kombu matches with (`TopicExchange.key_to_pattern`), queue.
pub fn binding_member(routing_key: &str, queue: &str) -> String {
    format!(
        "{routing_key}{SEP}{}{SEP}{queue}",
        topic::kombu_regex(routing_key)
    )
}

/// The queue a binding member routes `routing_key` to, if it does: a
/// member with a pattern was bound to a topic exchange (kombu's regex
/// semantics), one without to a direct exchange (equal keys).
pub(super) fn member_routes(member: &str, routing_key: &str) -> Option<String> {
    let mut parts = member.splitn(3, SEP);
    let (key, pattern, queue) = (parts.next()?, parts.next()?, parts.next()?);
    let routed = if pattern.is_empty() {
        key == routing_key
    } else {
        topic::kombu_matches(key, routing_key).unwrap_or(false)
    };
    routed.then(|| queue.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_members_as_kombu() {
        assert_eq!(
            binding_member("simple.*", "probe-q"),
            "simple.*\x06\x16^simple\\.[^\\.]+$\x06\x16probe-q"
        );
        assert_eq!(
            member_routes(&binding_member("simple.*", "q"), "simple.add"),
            Some("q".into())
        );
        assert_eq!(
            member_routes(&binding_member("simple.*", "q"), "other.add"),
            None
        );
        // A direct binding (no pattern), as kombu's SimpleQueue makes.
        assert_eq!(member_routes("r\x06\x16\x06\x16r", "r"), Some("r".into()));
        assert_eq!(member_routes("r\x06\x16\x06\x16r", "rr"), None);
    }

    #[test]
    fn our_tags_name_their_held_set() {
        assert_eq!(
            held_key_of_tag("w1.ab12.7").as_deref(),
            Some("commissaire-host.held.w1")
        );
        assert_eq!(
            held_key_of_tag("646a1a65-5d79-4eb5-837b-72785f2f2cb2"),
            None
        );
        assert!(valid_owner("w-0a1b_2"));
        assert!(!valid_owner("a.b") && !valid_owner("") && !valid_owner(&"x".repeat(65)));
        for name in [
            "unacked",
            "unacked_index",
            "unacked_mutex",
            "_kombu.binding.x",
            "commissaire-host.held.w",
        ] {
            assert!(reserved(name).is_some(), "{name}");
        }
        assert_eq!(reserved("simple"), None);
    }

    #[test]
    fn priority_lists_as_kombu() {
        assert_eq!(
            queue_lists("q"),
            ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
        );
        assert_eq!(queue_of_list("q\x06\x166"), "q");
        assert_eq!(queue_of_list("q"), "q");
        let steps: Vec<u8> = [-1, 0, 2, 3, 5, 6, 8, 9, 12].map(priority_step).to_vec();
        assert_eq!(steps, [0, 0, 0, 3, 3, 6, 6, 9, 9]);
    }
}
