//! Routing keys: the two flavours of topic matching, and the checks on a
//! key a caller gives.
//!
//! - [`matches`]: AMQP's rules, which RabbitMQ and the embedded bus apply:
//!   words split on `.`, `*` is exactly one word, `#` is zero or more words.
//! - [`kombu_matches`]: what kombu's Redis transport does with the same
//!   binding: it turns the binding into a regular expression
//!   ([`kombu_regex`], kombu's `TopicExchange.key_to_pattern`) and matches
//!   characters, not words. `#` becomes `.*?`, so `a.#` does not match `a`;
//!   a `*` inside a word repeats the character before it.
//!
//! Both run as a set of states stepped once per word (or character): time
//! is bounded by input length times pattern length, never exponential, and
//! nothing recurses on the input, so a binding of any length is safe.

/// The longest routing key a bus carries: an AMQP short string.
pub const MAX_ROUTING_KEY_BYTES: usize = 255;

/// Why a routing key cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingKeyError {
    /// Nothing to route by.
    #[error("the routing key is empty")]
    Empty,
    /// Over [`MAX_ROUTING_KEY_BYTES`].
    #[error("routing key `{shown}…` is {len} bytes long; at most 255 can be sent")]
    TooLong {
        /// Its first characters.
        shown: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A control character (a newline, a NUL…): AMQP would carry it, but
    /// no service binds such a key, and it garbles logs.
    #[error("routing key {shown:?} holds a control character")]
    Control {
        /// Its first characters, escaped.
        shown: String,
    },
}

/// Checks a routing key a caller gave (HTTP, `call`, a handler's bus call)
/// before it is published or matched.
pub fn check_routing_key(key: &str) -> Result<(), RoutingKeyError> {
    let shown = || key.chars().take(40).collect::<String>();
    if key.is_empty() {
        Err(RoutingKeyError::Empty)
    } else if key.len() > MAX_ROUTING_KEY_BYTES {
        Err(RoutingKeyError::TooLong {
            shown: shown(),
            len: key.len(),
        })
    } else if key.chars().any(char::is_control) {
        Err(RoutingKeyError::Control { shown: shown() })
    } else {
        Ok(())
    }
}

/// The states of a pattern automaton reached so far: a list, and marks so
/// that each state is listed once.
struct States {
    list: Vec<usize>,
    marked: Vec<bool>,
}

impl States {
    fn new(count: usize) -> Self {
        Self {
            list: Vec::new(),
            marked: vec![false; count],
        }
    }

    fn clear(&mut self) {
        for s in self.list.drain(..) {
            self.marked[s] = false;
        }
    }

    /// Adds `state` and every state reachable from it without input
    /// (`skip(state)` says whether `state` may be passed over).
    fn add(&mut self, mut state: usize, skip: impl Fn(usize) -> bool) {
        while state < self.marked.len() && !self.marked[state] {
            self.marked[state] = true;
            self.list.push(state);
            if !skip(state) {
                break;
            }
            state += 1;
        }
    }

    fn contains(&self, state: usize) -> bool {
        self.marked.get(state).copied().unwrap_or(false)
    }
}

/// Whether `routing_key` matches binding `pattern` by AMQP's topic rules.
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let end = pattern.len();
    // State i: the words so far matched `pattern[..i]`.
    let skip = |i: usize| pattern.get(i) == Some(&"#");
    let mut current = States::new(end + 1);
    let mut next = States::new(end + 1);
    current.add(0, skip);
    for word in routing_key.split('.') {
        next.clear();
        for &i in &current.list {
            match pattern.get(i) {
                Some(&"#") => next.add(i, skip),
                Some(&"*") => next.add(i + 1, skip),
                Some(w) if *w == word => next.add(i + 1, skip),
                _ => {}
            }
        }
        if next.list.is_empty() {
            return false;
        }
        std::mem::swap(&mut current, &mut next);
    }
    current.contains(end)
}

/// kombu's `TopicExchange.key_to_pattern`: `*` → `[^\.]+`, `#` → `.*?`,
/// other words regex-escaped except for `*` and `#` (kombu's
/// `escape_regex(key, '.#*')`), joined by `\.`, anchored.
pub fn kombu_regex(binding: &str) -> String {
    let words: Vec<String> = binding
        .split('.')
        .map(|word| match word {
            "*" => r"[^\.]+".to_owned(),
            "#" => ".*?".to_owned(),
            word => word
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() || c == '#' || c == '*' {
                        c.to_string()
                    } else if c == '\0' {
                        r"\000".to_owned()
                    } else {
                        format!("\\{c}")
                    }
                })
                .collect(),
        })
        .collect();
    format!("^{}$", words.join(r"\."))
}

/// What one step of kombu's pattern takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// One given character.
    Char(char),
    /// Any character but `.` (`[^\.]`).
    NotDot,
    /// Any character but a newline (Python's `.`).
    NotNewline,
}

impl Class {
    fn takes(self, c: char) -> bool {
        match self {
            Self::Char(want) => c == want,
            Self::NotDot => c != '.',
            Self::NotNewline => c != '\n',
        }
    }
}

/// One step of kombu's pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Exactly one character of the class.
    One(Class),
    /// Zero or more.
    Many(Class),
}

/// kombu's pattern for `binding` as steps; `None` when Python's `re`
/// could not compile it (a word starting with `*`, or `**`: "nothing to
/// repeat", "multiple repeat").
fn kombu_steps(binding: &str) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    for (i, word) in binding.split('.').enumerate() {
        if i > 0 {
            steps.push(Step::One(Class::Char('.')));
        }
        match word {
            "*" => {
                steps.push(Step::One(Class::NotDot));
                steps.push(Step::Many(Class::NotDot));
            }
            "#" => steps.push(Step::Many(Class::NotNewline)),
            word => {
                // A `*` opening a word repeats the `\.` before it
                // (`x.*a` is `^x\.*a$`); only the first word has nothing
                // to repeat.
                let mut after_char = i > 0;
                for c in word.chars() {
                    if c == '*' {
                        // A quantifier on the character before it.
                        match steps.pop() {
                            Some(Step::One(class)) if after_char => {
                                steps.push(Step::Many(class));
                            }
                            _ => return None,
                        }
                        after_char = false;
                    } else {
                        steps.push(Step::One(Class::Char(c)));
                        after_char = true;
                    }
                }
            }
        }
    }
    Some(steps)
}

/// Whether `routing_key` matches a topic binding `binding` exactly as
/// kombu's regex does. `None` when kombu could not compile the pattern
/// (kombu then fails to publish).
pub fn kombu_matches(binding: &str, routing_key: &str) -> Option<bool> {
    let steps = kombu_steps(binding)?;
    let end = steps.len();
    let skip = |i: usize| matches!(steps.get(i), Some(Step::Many(_)));
    let mut current = States::new(end + 1);
    let mut next = States::new(end + 1);
    current.add(0, skip);
    // Python's `$` also matches before a final newline.
    let mut matched_before_newline = false;
    for (at, c) in routing_key.char_indices() {
        if c == '\n' && at + 1 == routing_key.len() {
            matched_before_newline = current.contains(end);
        }
        next.clear();
        for &i in &current.list {
            match steps.get(i) {
                Some(Step::One(class)) if class.takes(c) => next.add(i + 1, skip),
                Some(Step::Many(class)) if class.takes(c) => next.add(i, skip),
                _ => {}
            }
        }
        std::mem::swap(&mut current, &mut next);
        if current.list.is_empty() {
            break;
        }
    }
    Some(current.contains(end) || matched_before_newline)
}

#[cfg(test)]
mod tests {
    use super::{kombu_matches, kombu_regex, matches};

    #[test]
    fn star_is_exactly_one_word() {
        assert!(matches("simple.*", "simple.add"));
        assert!(!matches("simple.*", "simple"));
        assert!(!matches("simple.*", "simple.a.b"));
        assert!(!matches("simple.*", "other.add"));
    }

    #[test]
    fn hash_is_any_number_of_words() {
        assert!(matches("#", "a.b.c"));
        assert!(matches("queues.#", "queues"));
        assert!(matches("queues.#.x", "queues.a.b.x"));
        assert!(!matches("queues.#.x", "queues.a.b"));
        assert!(matches("#.#.x", "x"));
        assert!(matches("a.#.#", "a"));
    }

    #[test]
    fn routing_keys_a_bus_cannot_carry_are_refused() {
        use super::{check_routing_key, RoutingKeyError};
        assert_eq!(check_routing_key("simple.add"), Ok(()));
        assert_eq!(check_routing_key(&"a".repeat(255)), Ok(()));
        assert_eq!(check_routing_key(""), Err(RoutingKeyError::Empty));
        let long = "é".repeat(128);
        match check_routing_key(&long) {
            Err(RoutingKeyError::TooLong { shown, len }) => {
                assert_eq!((shown.chars().count(), len), (40, 256));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_routing_key("simple.add\n"),
            Err(RoutingKeyError::Control { .. })
        ));
        assert!(matches!(
            check_routing_key("simple\0add"),
            Err(RoutingKeyError::Control { .. })
        ));
    }

    #[test]
    fn literal_keys() {
        assert!(matches("simple.add", "simple.add"));
        assert!(!matches("simple.add", "simple.sub"));
    }

    /// The same bindings and keys through both flavours: where kombu's
    /// regex and AMQP's words part ways. kombu's column was printed by
    /// kombu 5.7's own `TopicExchange`.
    #[test]
    fn the_flavours_contrasted() {
        let cases: &[(&str, &str, bool, bool)] = &[
            // binding, routing key, AMQP, kombu
            ("simple.*", "simple.add", true, true),
            ("simple.*", "simple", false, false),
            ("simple.*", "simple.", true, false),
            ("a.#", "a", true, false),
            ("#.b", "b", true, false),
            ("a.#.b", "a.b", true, false),
            ("queues.#", "queues.", true, true),
            ("queues.#.x", "queues..x", true, true),
            ("#", "", true, true),
            ("#", "a\nb", true, false),
            ("*", "a\nb", true, true),
            ("a*b", "aab", false, true),
            ("a*b", "b", false, true),
            ("a*b", "a*b", true, false),
            ("a#b", "a#b", true, true),
            ("a+b", "a+b", true, true),
            ("a+b", "aab", false, false),
            ("simple.add", "simple.add\n", false, true),
            ("é.*", "é.ü", true, true),
        ];
        for (binding, key, amqp, kombu) in cases {
            assert_eq!(matches(binding, key), *amqp, "AMQP {binding:?} {key:?}");
            assert_eq!(
                kombu_matches(binding, key),
                Some(*kombu),
                "kombu {binding:?} {key:?}"
            );
        }
    }

    /// Expected values printed by kombu 5.7's own `TopicExchange` (regex).
    #[test]
    fn topic_matching_as_kombu() {
        let cases: &[(&str, &str, bool)] = &[
            ("simple.*", "simple.a.b", false),
            ("simple.*", "other.add", false),
            ("#", "a.b.c", true),
            ("queues.#", "queues", false),
            ("queues.#", "queues.a.b", true),
            ("queues.#.x", "queues.a.b.x", true),
            ("queues.#.x", "queues.x", false),
            ("#.b", "x.b", true),
            ("*.b", "x.b", true),
            ("*", "a.b", false),
            ("*", "a", true),
            ("a*b", "axb", false),
            ("simple.add", "simple.add", true),
            ("simple.add", "simple.sub", false),
            ("a.#", "a.x\ny", false),
            ("a-b", "a-b", true),
            ("a-*b", "ab", true),
            ("a-*b", "a--b", true),
            ("x.a*", "x.", true),
            ("x.a*", "x.aaa", true),
            ("a", "a\n\n", false),
            ("a\n", "a\n", true),
        ];
        for (binding, key, expected) in cases {
            assert_eq!(
                kombu_matches(binding, key),
                Some(*expected),
                "{binding:?} {key:?}"
            );
        }
        assert_eq!(kombu_matches("*a", "x"), None);
        // Found while writing the `topic` fuzz target's reference: a `*`
        // opening a later word repeats the `\.` (kombu 5.7 compiles
        // `^x\.*a$`).
        assert_eq!(kombu_matches("x.*a", "xa"), Some(true));
        assert_eq!(kombu_matches("x.*a", "x..a"), Some(true));
        assert_eq!(kombu_matches("#.*a", "b.a"), Some(true));
        assert_eq!(kombu_matches("x.*a", "x.b"), Some(false));
        assert_eq!(kombu_matches("a.**", "a"), None);
        assert_eq!(kombu_matches("a**", "x"), None);
        assert_eq!(kombu_regex("a.#.b-c"), r"^a\..*?\.b\-c$");
        assert_eq!(kombu_regex("simple.*"), r"^simple\.[^\.]+$");
    }

    /// A backtracking matcher tries every way to split 60 words among six
    /// `#`s; these answer at once.
    #[test]
    fn many_hashes_against_a_long_key() {
        let key = vec!["w"; 60].join(".");
        let pattern = "#.#.#.#.#.#.x";
        assert!(!matches(pattern, &key));
        assert_eq!(kombu_matches(pattern, &key), Some(false));
        let key = format!("{key}.x");
        assert!(matches(pattern, &key));
        assert_eq!(kombu_matches(pattern, &key), Some(true));
        // The regex flavour's own trap: `a*a*a*…` against `aaa…b`.
        let pattern = "a*".repeat(30);
        let key = format!("{}b", "a".repeat(30));
        assert_eq!(kombu_matches(&pattern, &key), Some(false));
    }

    /// Nothing recurses on the input: bindings and keys of any length.
    #[test]
    fn bindings_of_100k_characters() {
        let binding = "x".repeat(100_000);
        assert_eq!(kombu_matches(&binding, &binding), Some(true));
        assert_eq!(kombu_matches(&binding, "x"), Some(false));
        let words = vec!["a"; 50_000].join(".");
        assert!(matches(&words, &words));
        assert_eq!(kombu_matches(&words, &words), Some(true));
        let hashes = vec!["#"; 50_000].join(".");
        assert!(matches(&hashes, "a.b"));
        assert_eq!(kombu_matches(&hashes, "a.b"), Some(false));
        assert_eq!(kombu_matches(&hashes, "...."), Some(false));
        assert_eq!(kombu_regex(&binding).len(), 100_002);
    }

    /// The word-by-word automaton agrees with the plain recursive
    /// definition of AMQP's rules on every small case.
    #[test]
    fn amqp_matching_agrees_with_the_definition() {
        fn by_definition(pattern: &[&str], key: &[&str]) -> bool {
            match pattern.split_first() {
                None => key.is_empty(),
                Some((&"#", rest)) => (0..=key.len()).any(|n| by_definition(rest, &key[n..])),
                Some((&"*", rest)) => !key.is_empty() && by_definition(rest, &key[1..]),
                Some((w, rest)) => key.first() == Some(w) && by_definition(rest, &key[1..]),
            }
        }
        let words = ["a", "b", "*", "#", ""];
        let mut patterns = vec![String::new()];
        for _ in 0..3 {
            let longer: Vec<String> = patterns
                .iter()
                .flat_map(|p| {
                    words.iter().map(move |w| {
                        if p.is_empty() {
                            (*w).to_owned()
                        } else {
                            format!("{p}.{w}")
                        }
                    })
                })
                .collect();
            patterns.extend(longer);
        }
        patterns.sort();
        patterns.dedup();
        let keys: Vec<&String> = patterns
            .iter()
            .filter(|p| !p.contains(['*', '#']))
            .collect();
        for pattern in &patterns {
            for key in &keys {
                let p: Vec<&str> = pattern.split('.').collect();
                let k: Vec<&str> = key.split('.').collect();
                assert_eq!(
                    matches(pattern, key),
                    by_definition(&p, &k),
                    "{pattern:?} {key:?}"
                );
            }
        }
    }
}
