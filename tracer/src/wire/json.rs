//! A tolerant, bounded scanner for the top-level keys of a JSON object.
//!
//! Request bodies can be megabytes and the capture holds only their head, so the body is not
//! valid JSON: this walks the bytes it has, tracking strings and nesting, and reports top-level
//! (depth-1) keys with the raw text of scalar values. It never allocates per byte and stops at
//! the end of the input without error.

/// A top-level scalar: string contents (unescaped) or raw text, lent for the visit (the
/// scanner reuses its buffer: nothing is allocated per value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar<'a> {
    Str(&'a str),
    Raw(&'a str),
}

impl Scalar<'_> {
    /// The value as text.
    pub fn text(&self) -> &str {
        match self {
            Scalar::Str(s) | Scalar::Raw(s) => s,
        }
    }
}

/// Calls `visit(path, value)` for scalars whose path is at most two keys deep, e.g.
/// `["model"]` or `["stream_options", "include_usage"]`. Arrays are skipped.
#[cfg(test)]
pub fn scan(bytes: &[u8], visit: impl FnMut(&[&str], Scalar<'_>)) {
    Scanner::default().feed(bytes, visit);
}

/// [`scan`] that stops as soon as `visit` returns `true` (found what it wanted).
pub fn scan_until(bytes: &[u8], mut visit: impl FnMut(&[&str], Scalar<'_>) -> bool) {
    Scanner::default().walk(bytes, &mut visit);
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
    /// The last token decoded, and a key's allocation kept for the next key (reused, not
    /// state: a checkpoint does not carry them).
    #[serde(skip)]
    text: String,
    #[serde(skip)]
    spare: String,
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
    pub fn feed(&mut self, bytes: &[u8], mut visit: impl FnMut(&[&str], Scalar<'_>)) {
        self.walk(bytes, &mut |path, v| {
            visit(path, v);
            false
        });
    }

    /// Scans until the input ends or `visit` returns `true`.
    fn walk(&mut self, bytes: &[u8], visit: &mut impl FnMut(&[&str], Scalar<'_>) -> bool) {
        let mut i = 0;
        if !self.started {
            match memchr::memchr(b'{', bytes) {
                Some(at) => i = at,
                None => return,
            }
            self.started = true;
        }
        while i < bytes.len() && !self.done {
            let b = bytes[i];
            match self.token {
                Token::Str { escaped } => {
                    // Only strings that can be a key or a value at depth 1 or 2 are kept;
                    // the rest (a prompt's messages) go by in bulk.
                    let keep = self.array_depth == 0 && self.depth <= 2;
                    if !escaped {
                        let run =
                            memchr::memchr2(b'"', b'\\', &bytes[i..]).unwrap_or(bytes.len() - i);
                        if run > 0 {
                            if keep {
                                let room = TOKEN_KEEP.saturating_sub(self.buf.len());
                                self.buf.extend_from_slice(&bytes[i..i + run.min(room)]);
                            }
                            i += run;
                            continue;
                        }
                    }
                    if b == b'"' && !escaped {
                        self.token = Token::None;
                        self.text.clear();
                        if keep {
                            decode_into(&self.buf, &mut self.text);
                        }
                        self.buf.clear();
                        if self.string_done(visit) {
                            return;
                        }
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
                        self.text.clear();
                        self.text.push_str(&String::from_utf8_lossy(&self.buf));
                        self.buf.clear();
                        if self.array_depth == 0
                            && let Some(k) = self.key.take()
                        {
                            let stop = self.emit(&k, Scalar::Raw(&self.text), visit);
                            self.spare = k;
                            if stop {
                                return;
                            }
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
                        } else if let Some(k) = k {
                            self.spare = k;
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
                    if let Some(k) = self.key.take() {
                        self.spare = k;
                    }
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

    /// A string ended: it is the next key, or the value of the current one.
    fn string_done(&mut self, visit: &mut impl FnMut(&[&str], Scalar<'_>) -> bool) -> bool {
        if self.array_depth > 0 {
            return false;
        }
        if self.expect_key {
            let mut k = std::mem::take(&mut self.spare);
            k.clear();
            k.push_str(&self.text);
            self.key = Some(k);
            self.expect_key = false;
        } else if let Some(k) = self.key.take() {
            let stop = self.emit(&k, Scalar::Str(&self.text), visit);
            self.spare = k;
            return stop;
        }
        false
    }

    fn emit(
        &self,
        key: &str,
        v: Scalar<'_>,
        visit: &mut impl FnMut(&[&str], Scalar<'_>) -> bool,
    ) -> bool {
        match (self.depth, &self.outer) {
            (1, _) => visit(&[key], v),
            (2, Some(outer)) => visit(&[outer, key], v),
            _ => false,
        }
    }
}

/// Decodes a JSON string's contents (its bytes between the quotes, escapes and all) into
/// `out`; long strings are kept to 256 bytes.
fn decode_into(bytes: &[u8], out: &mut String) {
    // Most strings have no escape: one copy.
    if !bytes.contains(&b'\\') {
        out.push_str(&String::from_utf8_lossy(&bytes[..bytes.len().min(256)]));
        return;
    }
    let mut raw = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => {
                match bytes.get(i + 1) {
                    Some(b'u') => {
                        let (ch, used) = unicode_escape(&bytes[i..]);
                        if raw.len() < 256 {
                            let mut tmp = [0u8; 4];
                            raw.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
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
                        if raw.len() < 256 {
                            raw.push(c);
                        }
                    }
                    None => {}
                }
                i += 2;
            }
            c => {
                if raw.len() < 256 {
                    raw.push(c);
                }
                i += 1;
            }
        }
    }
    out.push_str(&String::from_utf8_lossy(&raw));
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
    fn scan_until_stops_at_what_it_wanted() {
        let mut seen = Vec::new();
        scan_until(
            br#"{"choices":[{"id":"inner"}],"id":"chatcmpl-4","model":"m","usage":{"x":1}}"#,
            |p, v| {
                seen.push((p.join("."), v.text().to_string()));
                p == ["id"]
            },
        );
        assert_eq!(seen, vec![("id".to_string(), "chatcmpl-4".to_string())]);
    }

    #[test]
    fn truncated_bodies_give_what_they_can() {
        let v = collect(r#"{"model":"m","max_tokens":12"#);
        assert_eq!(v, vec![("model".into(), "m".into())]);
        assert!(collect("garbage without braces").is_empty());
        assert!(collect(r#"{"messages":[{"content":"unterminated"#).is_empty());
    }
}
