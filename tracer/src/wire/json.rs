//! A tolerant, bounded scanner for the top-level keys of a JSON object.
//!
//! Request bodies can be megabytes and the capture holds only their head, so the body is not
//! valid JSON: this walks the bytes it has, tracking strings and nesting, and reports top-level
//! (depth-1) keys with the raw text of scalar values. It never allocates per byte and stops at
//! the end of the input without error.

/// A top-level scalar: string contents (unescaped only for the simple escapes) or raw text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
pub fn scan(bytes: &[u8], visit: impl FnMut(&[&str], Scalar)) {
    Scanner::default().feed(bytes, visit);
}

/// Raw bytes of a string or scalar kept at most (enough for 256 decoded bytes of most text).
const TOKEN_KEEP: usize = 1024;

/// [`scan`] over input that comes in pieces (a request body read by read): the state between
/// pieces is bounded (nesting counters, the current key and token up to [`TOKEN_KEEP`] bytes),
/// whatever the body's size; nothing of the body is kept.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Scanner {
    /// The opening brace was seen; the object closed.
    started: bool,
    done: bool,
    /// Object nesting (outside arrays) and array nesting.
    depth: usize,
    array_depth: usize,
    expect_key: bool,
    /// The key whose value comes next, and the key of the depth-2 object being read.
    key: Option<String>,
    outer: Option<String>,
    token: Token,
    buf: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Token {
    #[default]
    None,
    /// Inside a string; `escaped`: the previous byte was an unescaped backslash.
    Str { escaped: bool },
    /// Inside a bare scalar (number, `true`, ...).
    Raw,
}

impl Scanner {
    /// The top-level object closed: nothing more to find.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Scans the next piece.
    pub fn feed(&mut self, bytes: &[u8], mut visit: impl FnMut(&[&str], Scalar)) {
        let mut i = 0;
        if !self.started {
            while i < bytes.len() && bytes[i] != b'{' {
                i += 1;
            }
            if i == bytes.len() {
                return;
            }
            self.started = true;
        }
        while i < bytes.len() && !self.done {
            let b = bytes[i];
            match self.token {
                Token::Str { escaped } => {
                    if b == b'"' && !escaped {
                        self.token = Token::None;
                        let (text, _) = string(&self.buf, 0);
                        self.buf.clear();
                        self.string_done(text, &mut visit);
                    } else {
                        if self.buf.len() < TOKEN_KEEP {
                            self.buf.push(b);
                        }
                        self.token = Token::Str {
                            escaped: b == b'\\' && !escaped,
                        };
                    }
                    i += 1;
                    continue;
                }
                Token::Raw => {
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                        self.token = Token::None;
                        let raw = String::from_utf8_lossy(&self.buf).into_owned();
                        self.buf.clear();
                        if self.array_depth == 0
                            && let Some(k) = self.key.take()
                        {
                            self.emit(&k, Scalar::Raw(raw), &mut visit);
                        }
                        // The delimiter is handled below.
                    } else {
                        if self.buf.len() < TOKEN_KEEP {
                            self.buf.push(b);
                        }
                        i += 1;
                        continue;
                    }
                }
                Token::None => {}
            }
            match b {
                b'{' => {
                    if self.array_depth == 0 {
                        self.depth += 1;
                        let k = self.key.take();
                        if self.depth == 2 {
                            self.outer = k;
                        }
                        self.expect_key = true;
                    }
                }
                b'}' => {
                    if self.array_depth == 0 {
                        if self.depth == 2 {
                            self.outer = None;
                        }
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            self.done = true;
                        }
                    }
                    self.expect_key = false;
                }
                b'[' => {
                    self.array_depth += 1;
                    self.key = None;
                }
                b']' => self.array_depth = self.array_depth.saturating_sub(1),
                b',' => {
                    if self.array_depth == 0 {
                        self.expect_key = true;
                    }
                }
                b'"' => self.token = Token::Str { escaped: false },
                b' ' | b'\t' | b'\r' | b'\n' | b':' => {}
                _ => {
                    self.token = Token::Raw;
                    self.buf.push(b);
                }
            }
            i += 1;
        }
    }

    fn string_done(&mut self, s: String, visit: &mut impl FnMut(&[&str], Scalar)) {
        if self.array_depth > 0 {
            return;
        }
        if self.expect_key {
            self.key = Some(s);
            self.expect_key = false;
        } else if let Some(k) = self.key.take() {
            self.emit(&k, Scalar::Str(s), visit);
        }
    }

    fn emit(&self, key: &str, v: Scalar, visit: &mut impl FnMut(&[&str], Scalar)) {
        match (self.depth, &self.outer) {
            (1, _) => visit(&[key], v),
            (2, Some(outer)) => visit(&[outer, key], v),
            _ => {}
        }
    }
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
    fn pieces_of_any_size_give_the_same_keys() {
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"{} \" {{ [ \u00e9 model"}}],"stream_options":{{"x":[1,{{"y":2}}],"include_usage":true}},"model":"caf\u00e9","stream":true,"max_tokens":128}}"#,
            "p".repeat(20_000)
        );
        let whole = collect(&body);
        assert_eq!(
            whole,
            vec![
                ("stream_options.include_usage".into(), "true".into()),
                ("model".into(), "café".into()),
                ("stream".into(), "true".into()),
                ("max_tokens".into(), "128".into()),
            ]
        );
        for size in [1, 2, 3, 7, 64, 4096] {
            let mut s = Scanner::default();
            let mut v = Vec::new();
            for piece in body.as_bytes().chunks(size) {
                s.feed(piece, |p, x| v.push((p.join("."), x.text().to_string())));
            }
            assert_eq!(v, whole, "pieces of {size}");
            assert!(
                s.buf.capacity() <= 2 * TOKEN_KEEP,
                "state grew: {}",
                s.buf.capacity()
            );
        }
    }

    #[test]
    fn deep_nesting_keeps_no_state() {
        let mut s = Scanner::default();
        let mut n = 0;
        let deep = format!(
            r#"{{"a":{}1{}, "model":"m"}}"#,
            "{\"k\":".repeat(100_000),
            "}".repeat(100_000)
        );
        s.feed(deep.as_bytes(), |_, _| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn truncated_bodies_give_what_they_can() {
        let v = collect(r#"{"model":"m","max_tokens":12"#);
        assert_eq!(v, vec![("model".into(), "m".into())]);
        assert!(collect("garbage without braces").is_empty());
        assert!(collect(r#"{"messages":[{"content":"unterminated"#).is_empty());
    }
}
