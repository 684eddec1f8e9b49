//! Query strings: percent-decoding and times (Unix milliseconds or RFC 3339).

use std::collections::BTreeMap;

use super::reply::{Reply, error};

/// `%XX` and `+` decoded; `None` for malformed escapes or non-UTF-8.
fn decode(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The query string's parameters; an error names the first bad one.
pub(super) fn params(query: Option<&str>) -> Result<BTreeMap<String, String>, Reply> {
    let mut out = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (decode(k), decode(v)) else {
            return Err(error(400, format!("malformed query parameter {pair:?}")));
        };
        out.insert(k, v);
    }
    Ok(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix milliseconds, or RFC 3339 (`2026-12-05T10:00:00Z`, fractions and offsets allowed).
pub fn parse_time(text: &str) -> Option<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    let bytes = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { text.get(r)?.parse().ok() };
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut ms = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let first3: String = frac[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        ms = first3.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_min = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let v = num(1..3).and_then(|_| rest[1..3].parse::<i64>().ok())? * 60
                + rest[4..6].parse::<i64>().ok()?;
            if *sign == b'+' { v } else { -v }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset_min * 60;
    Some(secs * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::{params, parse_time};

    #[test]
    fn times_in_milliseconds_and_rfc_3339() {
        assert_eq!(parse_time("1796468585556"), Some(1_796_468_585_556));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2026-12-05T10:00:00Z"), Some(1_796_464_800_000));
        assert_eq!(
            parse_time("2026-12-05T10:00:00.25Z"),
            Some(1_796_464_800_250)
        );
        assert_eq!(
            parse_time("2026-12-05T12:00:00+02:00"),
            Some(1_796_464_800_000)
        );
        assert_eq!(
            parse_time("2024-02-29T00:00:00-00:30"),
            Some(1_709_166_600_000)
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-12-05 10:00",
            "2026-12-05T10:00:00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn query_strings_are_decoded_and_bad_escapes_refused() {
        let p = params(Some("model=a%2Fb+c&limit=2&flag")).expect("valid");
        assert_eq!(p["model"], "a/b c");
        assert_eq!(p["limit"], "2");
        assert_eq!(p["flag"], "");
        assert!(params(Some("model=%zz")).is_err());
        assert!(params(Some("model=%ff")).is_err(), "not UTF-8");
    }
}
