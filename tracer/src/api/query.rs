//! Query strings: percent-decoding and times (Unix milliseconds or RFC 3339).

use std::collections::BTreeMap;

use super::reply::{Reply, error};
pub use crate::wallclock::parse_time;

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
