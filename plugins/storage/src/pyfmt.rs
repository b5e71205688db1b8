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

    #[test]
    fn iso_dates() {
        assert!(is_iso_datetime("9999-12-31T23:59:59.999999"));
        assert!(is_iso_datetime("2016-02-29T01:02:03.4"));
        assert!(!is_iso_datetime("2015-02-29T01:02:03.4"));
        assert!(!is_iso_datetime("2016-01-01T01:02:03"));
        assert!(!is_iso_datetime(""));
    }
}
