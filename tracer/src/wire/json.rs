//! A tolerant, bounded scanner for the top-level keys of a JSON object.
//!
//! Request bodies can be megabytes and the capture holds only their head, so the body is not
//! valid JSON: this walks the bytes it has, tracking strings and nesting, and reports top-level
//! (depth-1) keys with the raw text of scalar values. It never allocates per byte and stops at
//! the end of the input without error.

/// A top-level scalar: string contents (unescaped only for the simple escapes) or raw text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scalar {
    Str(String),
    Raw(String),
}

impl Scalar {
    /// The value as text.
    pub fn text(&self) -> &str {
        match self {
            Scalar::Str(s) | Scalar::Raw(s) => s,
        }
    }
}

/// Calls `visit(path, value)` for scalars whose path is at most two keys deep, e.g.
/// `["model"]` or `["stream_options", "include_usage"]`. Arrays are skipped.
pub fn scan(bytes: &[u8], mut visit: impl FnMut(&[&str], Scalar)) {
    let mut i = 0;
    // Skip to the opening brace.
    while i < bytes.len() && bytes[i] != b'{' {
        i += 1;
    }
    let mut path: Vec<String> = Vec::new();
    // Depth of objects entered at a path position, and array nesting to skip.
    let mut depth = 0usize;
    let mut array_depth = 0usize;
    let mut expect_key = false;
    let mut key: Option<String> = None;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'{' => {
                if array_depth == 0 {
                    depth += 1;
                    if let Some(k) = key.take() {
                        path.push(k);
                    }
                    expect_key = true;
                }
                i += 1;
            }
            b'}' => {
                if array_depth == 0 {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return;
                    }
                    path.pop();
                }
                expect_key = false;
                i += 1;
            }
            b'[' => {
                array_depth += 1;
                key = None;
                i += 1;
            }
            b']' => {
                array_depth = array_depth.saturating_sub(1);
                i += 1;
            }
            b',' => {
                if array_depth == 0 {
                    expect_key = true;
                }
                i += 1;
            }
            b'"' => {
                let (s, next) = string(bytes, i + 1);
                i = next;
                if array_depth > 0 {
                    continue;
                }
                if expect_key {
                    key = Some(s);
                    expect_key = false;
                } else if let Some(k) = key.take() {
                    emit(&path, &k, Scalar::Str(s), &mut visit);
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' | b':' => i += 1,
            _ => {
                let start = i;
                while i < bytes.len()
                    && !matches!(bytes[i], b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
                {
                    i += 1;
                }
                if array_depth == 0
                    && let Some(k) = key.take()
                {
                    // A raw scalar cut off by the end of the capture is not trustworthy.
                    if i < bytes.len() {
                        let raw = String::from_utf8_lossy(&bytes[start..i]).into_owned();
                        emit(&path, &k, Scalar::Raw(raw), &mut visit);
                    }
                }
            }
        }
    }
}

fn emit(path: &[String], key: &str, v: Scalar, visit: &mut impl FnMut(&[&str], Scalar)) {
    if path.len() > 1 {
        return;
    }
    let mut full: Vec<&str> = path.iter().map(String::as_str).collect();
    full.push(key);
    visit(&full, v);
}

/// Reads a JSON string starting after its opening quote; returns it and the index after the
/// closing quote (or the end of input when it is cut off). Long strings are kept to 256 bytes.
fn string(bytes: &[u8], mut i: usize) -> (String, usize) {
    let mut out = Vec::new();
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return (String::from_utf8_lossy(&out).into_owned(), i + 1),
            b'\\' => {
                match bytes.get(i + 1) {
                    Some(b'u') => {
                        let (ch, used) = unicode_escape(&bytes[i..]);
                        if out.len() < 256 {
                            let mut tmp = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                        }
                        i += used;
                        continue;
                    }
                    Some(&c) => {
                        let c = match c {
                            b'n' => b'\n',
                            b't' => b'\t',
                            b'r' => b'\r',
                            b'b' => 8,
                            b'f' => 12,
                            other => other,
                        };
                        if out.len() < 256 {
                            out.push(c);
                        }
                    }
                    None => {}
                }
                i += 2;
            }
            c => {
                if out.len() < 256 {
                    out.push(c);
                }
                i += 1;
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), bytes.len())
}

/// Decodes `\\uXXXX` (and a following low surrogate) at the start of `b`; returns the
/// character (U+FFFD when invalid or cut off) and the bytes used.
fn unicode_escape(b: &[u8]) -> (char, usize) {
    let hex = |at: usize| {
        b.get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    };
    let Some(hi) = hex(2) else {
        return ('\u{fffd}', b.len().min(6));
    };
    if (0xD800..0xDC00).contains(&hi)
        && b.get(6..8) == Some(b"\\u")
        && let Some(lo) = hex(8).filter(|lo| (0xDC00..0xE000).contains(lo))
    {
        let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
        return (char::from_u32(c).unwrap_or('\u{fffd}'), 12);
    }
    (char::from_u32(hi).unwrap_or('\u{fffd}'), 6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(s: &str) -> Vec<(String, String)> {
        let mut v = Vec::new();
        scan(s.as_bytes(), |p, x| {
            v.push((p.join("."), x.text().to_string()));
        });
        v
    }

    #[test]
    fn top_level_and_one_nested_level_only() {
        let v = collect(
            r#"{"model": "llama", "messages":[{"role":"user","content":"say \"model\": x"}],
               "stream":true, "stream_options":{"include_usage":true, "deep":{"x":1}}, "max_tokens":64}"#,
        );
        assert_eq!(
            v,
            vec![
                ("model".into(), "llama".into()),
                ("stream".into(), "true".into()),
                ("stream_options.include_usage".into(), "true".into()),
                ("max_tokens".into(), "64".into()),
            ]
        );
    }

    #[test]
    fn unicode_escapes_are_decoded() {
        let v = collect(r#"{"model":"caf\u00e9-\ud83d\ude00","x":"\u12"}"#);
        assert_eq!(v[0], ("model".into(), "café-😀".into()));
    }

    #[test]
    fn truncated_bodies_give_what_they_can() {
        let v = collect(r#"{"model":"m","max_tokens":12"#);
        assert_eq!(v, vec![("model".into(), "m".into())]);
        assert!(collect("garbage without braces").is_empty());
        assert!(collect(r#"{"messages":[{"content":"unterminated"#).is_empty());
    }
}
