//! Both topic matchers, given a binding and a routing key.
//!
//! Properties: AMQP's matcher agrees with the recursive definition of its
//! rules; kombu's matcher agrees with a small backtracking reading of the
//! regular expression kombu compiles (`kombu_regex`), Python's `re`
//! semantics for the constructs it uses, compile errors included; and the
//! two flavours agree where their rules agree (literal and `*` words, no
//! empty or multi-line keys).
//!
//! Input: binding and key over a small alphabet, split at the byte 0xFF.
#![no_main]

use std::collections::HashMap;

use commissaire_host::bus::topic::{kombu_matches, kombu_regex, matches};
use libfuzzer_sys::fuzz_target;

const ALPHABET: [char; 10] = ['a', 'b', '.', '*', '#', '.', '\n', '-', 'é', '\0'];

fn text(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| ALPHABET[usize::from(b) % ALPHABET.len()])
        .collect()
}

/// AMQP's rules by definition: `*` one word, `#` zero or more.
fn amqp_reference(pattern: &[&str], key: &[&str]) -> bool {
    fn go(p: &[&str], k: &[&str], memo: &mut HashMap<(usize, usize), bool>) -> bool {
        let at = (p.len(), k.len());
        if let Some(&known) = memo.get(&at) {
            return known;
        }
        let r = match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|n| go(rest, &k[n..], memo)),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..], memo),
            Some((w, rest)) => k.first() == Some(w) && go(rest, &k[1..], memo),
        };
        memo.insert(at, r);
        r
    }
    go(pattern, key, &mut HashMap::new())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Atom {
    Char(char),
    NotDot,
    Any,
}

#[derive(Debug, Clone, Copy)]
struct Piece {
    atom: Atom,
    min: usize,
    many: bool,
}

/// Compiles the subset of Python regex syntax kombu's patterns use; `None`
/// where Python's `re.compile` raises ("nothing to repeat", "multiple
/// repeat").
fn compile(regex: &str) -> Option<Vec<Piece>> {
    let body = regex.strip_prefix('^')?.strip_suffix('$')?;
    let chars: Vec<char> = body.chars().collect();
    let mut pieces: Vec<Piece> = Vec::new();
    let mut i = 0;
    // Whether the last piece may take a quantifier.
    let mut quantifiable = false;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        let atom = match c {
            '*' | '+' => {
                if !quantifiable {
                    return None;
                }
                let last = pieces.last_mut()?;
                last.many = true;
                if c == '*' {
                    last.min = 0;
                }
                if chars.get(i) == Some(&'?') {
                    i += 1;
                }
                quantifiable = false;
                continue;
            }
            '\\' => {
                if chars[i..].starts_with(&['0', '0', '0']) {
                    i += 3;
                    Atom::Char('\0')
                } else {
                    let e = *chars.get(i)?;
                    i += 1;
                    Atom::Char(e)
                }
            }
            '[' if chars[i..].starts_with(&['^', '\\', '.', ']']) => {
                i += 4;
                Atom::NotDot
            }
            '.' => Atom::Any,
            c => Atom::Char(c),
        };
        pieces.push(Piece {
            atom,
            min: 1,
            many: false,
        });
        quantifiable = true;
    }
    Some(pieces)
}

fn takes(atom: Atom, c: char) -> bool {
    match atom {
        Atom::Char(w) => c == w,
        Atom::NotDot => c != '.',
        Atom::Any => c != '\n',
    }
}

/// `re.match` of the compiled pattern: `$` also before a final newline.
fn kombu_reference(binding: &str, key: &str) -> Option<bool> {
    let pieces = compile(&kombu_regex(binding))?;
    let key: Vec<char> = key.chars().collect();
    fn go(
        p: &[Piece],
        pi: usize,
        k: &[char],
        ki: usize,
        memo: &mut HashMap<(usize, usize), bool>,
    ) -> bool {
        if let Some(&known) = memo.get(&(pi, ki)) {
            return known;
        }
        let r = match p.get(pi) {
            None => ki == k.len() || (ki + 1 == k.len() && k[ki] == '\n'),
            Some(piece) => {
                let mut r = false;
                let mut taken = 0;
                let mut at = ki;
                loop {
                    if taken >= piece.min && go(p, pi + 1, k, at, memo) {
                        r = true;
                        break;
                    }
                    if (taken >= 1 && !piece.many) || at >= k.len() || !takes(piece.atom, k[at]) {
                        break;
                    }
                    taken += 1;
                    at += 1;
                }
                r
            }
        };
        memo.insert((pi, ki), r);
        r
    }
    Some(go(&pieces, 0, &key, 0, &mut HashMap::new()))
}

fuzz_target!(|data: &[u8]| {
    let (p, k) = match data.iter().position(|&b| b == 0xFF) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    // The references are quadratic: keep inputs short.
    if p.len() > 64 || k.len() > 64 {
        return;
    }
    let (binding, key) = (text(p), text(k));
    let b_words: Vec<&str> = binding.split('.').collect();
    let k_words: Vec<&str> = key.split('.').collect();

    let amqp = matches(&binding, &key);
    assert_eq!(
        amqp,
        amqp_reference(&b_words, &k_words),
        "AMQP {binding:?} {key:?}"
    );

    let kombu = kombu_matches(&binding, &key);
    assert_eq!(
        kombu,
        kombu_reference(&binding, &key),
        "kombu {binding:?} {key:?}"
    );

    let same_rules = b_words.iter().all(|w| *w == "*" || !w.contains(['*', '#']))
        && k_words.iter().all(|w| !w.is_empty())
        && !key.contains('\n');
    if same_rules {
        assert_eq!(kombu, Some(amqp), "flavours {binding:?} {key:?}");
    }
});
