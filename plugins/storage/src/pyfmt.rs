//! Python's spellings of values, types and dates, for error messages a
//! caller of the original may match on.

use serde_json::Value;

/// `repr(s)` of a Python `str`.
pub fn repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The Python type of a decoded JSON value.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// `str(value)` for the scalars a key may be built from.
pub fn str_of(value: &Value) -> String {
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `json.dumps(value)` as Python writes it, which is how the original's
/// notification bodies (kombu's JSON serializer) and stored records
/// (`Model.to_json`) look: `", "` and `": "` between items, every character
/// outside printable ASCII escaped (`ensure_ascii`), floats as `repr`.
/// Objects come in the map's order (sorted keys), where Python kept the
/// order it was given. Appended to `out`.
pub fn write_json(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) if n.is_f64() => out.push_str(&float_repr(&n.to_string())),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_json_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json_str(out, key);
                out.push_str(": ");
                write_json(out, item);
            }
            out.push('}');
        }
    }
}

/// Appends a JSON string as `json.dumps` writes it (`ensure_ascii`).
pub fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr` of a float, from any decimal spelling of its shortest
/// digits (serde_json's): fixed notation for decimal exponents from -4 to
/// 16, else `d.ddde+XX`.
fn float_repr(text: &str) -> String {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().unwrap_or(0)),
        None => (text, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = int_part.chars().chain(frac_part.chars()).collect();
    let leading = all.len() - all.trim_start_matches('0').len();
    let digits = all.trim_start_matches('0').trim_end_matches('0');
    let sign = if negative { "-" } else { "" };
    if digits.is_empty() {
        return format!("{sign}0.0");
    }
    let len = i64::try_from(digits.len()).unwrap_or(i64::MAX);
    // Digits before the decimal point: Python's `decpt`.
    let point =
        i64::try_from(int_part.len()).unwrap_or(0) - i64::try_from(leading).unwrap_or(0) + exponent;
    if -4 < point && point <= 16 {
        if point <= 0 {
            let zeros = "0".repeat(usize::try_from(-point).unwrap_or(0));
            format!("{sign}0.{zeros}{digits}")
        } else if point >= len {
            let zeros = "0".repeat(usize::try_from(point - len).unwrap_or(0));
            format!("{sign}{digits}{zeros}.0")
        } else {
            let at = usize::try_from(point).unwrap_or(0);
            format!("{sign}{}.{}", &digits[..at], &digits[at..])
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let e = point - 1;
        let e_sign = if e < 0 { '-' } else { '+' };
        format!("{sign}{first}{dot}{rest}e{e_sign}{:02}", e.unsigned_abs())
    }
}

/// Whether `s` parses with `strptime(s, '%Y-%m-%dT%H:%M:%S.%f')`: each
/// field one or two digits (four for the year, 1–6 for the fraction),
/// within its range.
pub fn is_iso_datetime(s: &str) -> bool {
    let Some((date, time)) = s.split_once('T') else {
        return false;
    };
    let Some((hms, frac)) = time.split_once('.') else {
        return false;
    };
    let num = |t: &str, min: usize, max: usize| -> Option<u32> {
        if t.len() < min || t.len() > max || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = hms.split(':').collect();
    let ([y, mo, da], [h, mi, se]) = (d.as_slice(), t.as_slice()) else {
        return false;
    };
    let fields = (
        num(y, 4, 4),
        num(mo, 1, 2),
        num(da, 1, 2),
        num(h, 1, 2),
        num(mi, 1, 2),
        num(se, 1, 2),
        num(frac, 1, 6),
    );
    let (Some(y), Some(mo), Some(da), Some(h), Some(mi), Some(se), Some(_)) = fields else {
        return false;
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    y >= 1 && (1..=days).contains(&da) && h < 24 && mi < 60 && se < 62
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repr_picks_quotes_as_python_does() {
        assert_eq!(repr_str("Foo"), "'Foo'");
        assert_eq!(repr_str("it's"), "\"it's\"");
        assert_eq!(repr_str("'\""), "'\\'\"'");
        assert_eq!(repr_str("a\nb"), "'a\\nb'");
    }

    fn dumps(value: &Value) -> String {
        let mut out = String::new();
        write_json(&mut out, value);
        out
    }

    #[test]
    fn dumps_writes_what_python_writes() {
        use serde_json::json;
        // Each right-hand side is Python 3's `json.dumps` of the same value.
        assert_eq!(
            dumps(&json!({"b": [1, "x"], "a": {"c": null, "d": true}})),
            r#"{"a": {"c": null, "d": true}, "b": [1, "x"]}"#
        );
        assert_eq!(
            dumps(&json!("é\u{1F600}\"\\\n\u{1}\u{7f}~")),
            r#""\u00e9\ud83d\ude00\"\\\n\u0001\u007f~""#
        );
        let floats = [
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (123.456, "123.456"),
            (0.0, "0.0"),
        ];
        for (value, python) in floats {
            assert_eq!(dumps(&json!(value)), python, "{value}");
        }
    }

    #[test]
    fn iso_dates() {
        assert!(is_iso_datetime("9999-12-31T23:59:59.999999"));
        assert!(is_iso_datetime("2016-02-29T01:02:03.4"));
        assert!(!is_iso_datetime("2015-02-29T01:02:03.4"));
        assert!(!is_iso_datetime("2016-01-01T01:02:03"));
        assert!(!is_iso_datetime(""));
    }
}
