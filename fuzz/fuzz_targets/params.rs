//! Params binding through the `#[service]`-generated dispatch of a test
//! service with varied argument types.
//!
//! Properties: a call either binds (and the handler sees exactly what a
//! plain serde reading of each argument gives) or is refused with -32602,
//! never -32603 or a panic; a refusal happens exactly when that plain
//! reading fails.
#![no_main]

use commissaire_plugin_api::prelude::*;
use commissaire_plugin_api::testing::TestService;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Point {
    x: i32,
    label: Option<String>,
    tags: Vec<u8>,
}

#[derive(Default)]
pub struct Fuzz;

#[service(name = "fuzz")]
impl Fuzz {
    fn on_mixed(
        &self,
        n: i64,
        s: String,
        o: Option<u32>,
        p: Point,
        v: Vec<i16>,
    ) -> Result<Value, RpcError> {
        Ok(json!([n, s, o, p, v]))
    }

    fn on_flags(&self, b: bool, f: f64, u: Option<u8>) -> Result<Value, RpcError> {
        Ok(json!([b, f, u]))
    }

    fn on_nothing(&self) -> Result<bool, RpcError> {
        Ok(true)
    }
}

/// One argument read by serde alone: `None` when it does not bind.
fn arg<T: DeserializeOwned + Serialize>(v: Option<&Value>, optional: bool) -> Option<Value> {
    let v = match v {
        Some(v) => v.clone(),
        None if optional => Value::Null,
        None => return None,
    };
    let typed: T = match serde_json::from_value(v.clone()) {
        Ok(typed) => typed,
        // The binding takes an integral float as the integer the
        // contract's JSON Schema counts it as.
        Err(_) => serde_json::from_value(integers(v)).ok()?,
    };
    serde_json::to_value(typed).ok()
}

/// `v` with every integral float in the 64-bit integers' range (-2^63 to
/// below 2^64) an integer, as the binding's second reading has it.
fn integers(v: Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let two_63 = 9_223_372_036_854_775_808.0;
            if f.fract() != 0.0 {
                Value::Number(n)
            } else if (-two_63..0.0).contains(&f) {
                Value::from(f as i64)
            } else if (0.0..2.0 * two_63).contains(&f) {
                Value::from(f as u64)
            } else {
                Value::Number(n)
            }
        }
        Value::Array(items) => Value::Array(items.into_iter().map(integers).collect()),
        Value::Object(members) => {
            Value::Object(members.into_iter().map(|(k, v)| (k, integers(v))).collect())
        }
        other => other,
    }
}

/// What the handler should see for `params`, by a plain reading: `None`
/// when the call must be refused; `Some(None)` when the reading cannot
/// tell (serde_json's nesting limit).
fn expected(method: &str, params: &str) -> Option<Option<Value>> {
    let names: &[&str] = match method {
        "mixed" => &["n", "s", "o", "p", "v"],
        "flags" => &["b", "f", "u"],
        _ => &[],
    };
    let parsed: Value = match serde_json::from_str(params) {
        Ok(v) => v,
        // Valid JSON serde_json's `Value` refuses: too deep, a lone
        // surrogate escape (`\ud800` not followed by a low one: "lone
        // leading surrogate", "unexpected end of hex escape"), or a number
        // beyond f64 (`-1e4003`), which binds in a member the handler
        // ignores.
        Err(e)
            if [
                "recursion limit",
                "surrogate",
                "end of hex escape",
                "out of range",
            ]
            .iter()
            .any(|why| e.to_string().contains(why)) =>
        {
            return Some(None)
        }
        Err(_) => return None,
    };
    let values: Vec<Option<&Value>> = match &parsed {
        Value::Array(a) if a.len() <= names.len() => (0..names.len()).map(|i| a.get(i)).collect(),
        Value::Object(o) if o.keys().all(|k| names.contains(&k.as_str())) => {
            names.iter().map(|n| o.get(*n)).collect()
        }
        _ => return None,
    };
    let out = match method {
        "mixed" => json!([
            arg::<i64>(values[0], false)?,
            arg::<String>(values[1], false)?,
            arg::<Option<u32>>(values[2], true)?,
            arg::<Point>(values[3], false)?,
            arg::<Vec<i16>>(values[4], false)?,
        ]),
        "flags" => json!([
            arg::<bool>(values[0], false)?,
            arg::<f64>(values[1], false)?,
            arg::<Option<u8>>(values[2], true)?,
        ]),
        _ => json!(true),
    };
    Some(Some(out))
}

/// Whether some object in `text` names a member twice: serde_json's map
/// keeps the last, a derived struct reads the first (and may refuse it),
/// so a plain reading cannot say what binds.
fn has_duplicate_names(text: &str) -> bool {
    struct Unique;
    impl<'de> serde::Deserialize<'de> for Unique {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(UniqueVisitor)
        }
    }
    struct UniqueVisitor;
    impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
        type Value = Unique;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E>(self) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Unique, A::Error> {
            while a.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Unique, A::Error> {
            let mut names = std::collections::HashSet::new();
            while let Some(name) = a.next_key::<String>()? {
                if !names.insert(name) {
                    return Err(serde::de::Error::custom("duplicate"));
                }
                a.next_value::<Unique>()?;
            }
            Ok(Unique)
        }
    }
    serde_json::from_str::<Unique>(text).is_err_and(|e| e.to_string().starts_with("duplicate"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(params) = std::str::from_utf8(rest) else {
        return;
    };
    // The dispatcher hands on only params that are an array or an object.
    if !params.starts_with(['[', '{']) {
        return;
    }
    let method = ["mixed", "flags", "nothing"][usize::from(selector % 3)];
    thread_local! {
        static SVC: TestService<Fuzz> = TestService::new();
    }
    let got = SVC.with(|svc| svc.call_raw(method, params, Some("fuzz-reply")));
    let want = expected(method, params);
    match got {
        Ok(text) => {
            let got: Value = serde_json::from_str(&text).expect("the result is not JSON");
            match want {
                Some(Some(want)) => {
                    // Read back from text as `got` was: serde_json's float
                    // reading (without `float_roundtrip`) may land one ULP
                    // off the value a different spelling gave.
                    let want: Value = serde_json::from_str(&want.to_string()).expect("want");
                    assert_eq!(got, want, "{method} {params}");
                }
                Some(None) => {}
                None => panic!("{method} bound params a plain reading refuses: {params}"),
            }
        }
        Err(e) => {
            assert_eq!(
                e.code,
                RpcError::INVALID_PARAMS,
                "{method} {params}: {}",
                e.message
            );
            // A duplicate name is invisible to serde_json's map.
            assert!(
                !matches!(want, Some(Some(_)))
                    || e.message.contains("given twice")
                    || has_duplicate_names(params),
                "{method} refused params a plain reading binds: {params}: {}",
                e.message
            );
        }
    }
});
