//! Redaction: what the tracker reads is what gets persisted, with prompt and completion text
//! and credentials replaced, byte for byte, before anything reads them.
//!
//! The tracker works on a copy of each syscall's bytes, redacted in place as its framing
//! walks them ([`super::framing`]): header values of credentials, the string values of JSON
//! bodies (except the few keys attribution reads: `model`, `id`, `object`, `role`, `type`,
//! `finish_reason`...), numbers inside JSON arrays (token ids), and every body byte that is not
//! JSON. Structure stays: lengths, line breaks, chunk sizes, keys, `true`/`false`/`null`,
//! numbers that are a key's value (`max_tokens`, usage counts), SSE field names and `[DONE]`.
//! Because the tracker itself only ever reads the redacted bytes, a recording of them (the
//! journal) replays to exactly the records of the live run.
//!
//! The replacement is a keyed, prefix-preserving pseudonym, not encryption: each replaced byte
//! is derived from the key and every byte of its value up to it, so two prompts that start
//! alike still start alike (the prefix-cache estimate, `prefix.rs`, and the two ends of a
//! proxied request, `hops`, see the same sharing), while without the key nothing of the text
//! can be recovered, not even byte by byte. The key is the store's (`redaction.key`, never
//! in a recording), or random per run.

/// Header names whose values are credentials or carry them (compared lowercase, trimmed).
const SECRET_HEADERS: [&[u8]; 13] = [
    b"authorization",
    b"proxy-authorization",
    b"cookie",
    b"set-cookie",
    b"x-api-key",
    b"api-key",
    b"x-goog-api-key",
    b"openai-api-key",
    b"x-auth-token",
    b"ocp-apim-subscription-key",
    b"x-amz-security-token",
    b"referer",
    b"location",
];

/// Keys whose string values are kept: what attribution and the records read, never text.
const KEPT_VALUES: [&[u8]; 9] = [
    b"model",
    b"id",
    b"object",
    b"role",
    b"type",
    b"finish_reason",
    b"done_reason",
    b"stop_reason",
    b"system_fingerprint",
];

/// Longest key remembered (longer ones are never kept-value keys).
const KEY_MAX: usize = 24;

/// Objects nested deeper than this hold data, not what attribution reads (the deepest it
/// reads: `usage.prompt_tokens_details.cached_tokens`, and `choices[].finish_reason`).
const DEPTH_KEPT: usize = 3;

/// The redaction key and the byte pseudonym.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) struct Key([u64; 2]);

impl Key {
    pub(super) fn new(k: [u64; 2]) -> Self {
        Key(k)
    }

    /// The chain's start for a new value.
    fn start(self) -> u64 {
        self.0[0]
    }

    /// The chain after byte `b`.
    fn step(self, state: u64, b: u8) -> u64 {
        mix(state ^ u64::from(b) ^ self.0[1]).wrapping_add(self.0[0])
    }
}

/// `SplitMix64`'s finaliser: every input bit reaches every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const LETTERS: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

fn letter(state: u64) -> u8 {
    LETTERS[(state >> 40) as usize % LETTERS.len()]
}

fn digit(state: u64) -> u8 {
    b'1' + ((state >> 40) % 9) as u8
}

/// Bytes nothing reads: replaced, line breaks kept.
pub(super) fn opaque(data: &mut [u8]) {
    for b in data {
        if !matches!(*b, b'\r' | b'\n') {
            *b = b'x';
        }
    }
}

/// Where a head's redaction is.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "a line lexer's independent flags, each its own state"
)]
pub(super) struct HeadState {
    /// Bytes of the current line's name so far (lowercased), before its `:`.
    name: Vec<u8>,
    in_value: bool,
    secret: bool,
    /// The header before was secret (a folded continuation line stays secret).
    prev_secret: bool,
    /// Bytes on the current line so far (0 at a line start).
    line_len: usize,
    /// The current line ended in CR before its LF.
    cr: bool,
    /// On the start line: spaces seen, and inside the request target's query.
    start_line: bool,
    spaces: u8,
    in_query: bool,
    chain: u64,
    /// The blank line (CRLF) was seen: the rest is not head.
    done: bool,
    /// A bare-LF blank line: the framing will not end the head there, so everything after it
    /// (a body, as far as anyone knows) is replaced.
    opaque: bool,
}

impl HeadState {
    /// A new message starts.
    pub(super) fn reset(&mut self) {
        *self = HeadState {
            start_line: true,
            ..HeadState::default()
        };
    }

    /// Redacts head bytes in place, up to the blank line that ends the head (bytes after it
    /// are left for the body): credential header values, and the request target's query
    /// string (API keys travel there too).
    pub(super) fn redact(&mut self, key: Key, data: &mut [u8]) {
        let mut i = 0;
        while i < data.len() {
            if self.done {
                return;
            }
            // A value that is not a credential is left as it is: up to its line's end in one
            // step (most of a head's bytes).
            if self.in_value && !self.secret && !self.opaque {
                let run = memchr::memchr2(b'\n', b'\r', &data[i..]).unwrap_or(data.len() - i);
                if run > 0 {
                    self.line_len += run;
                    i += run;
                    continue;
                }
            }
            let b = &mut data[i];
            i += 1;
            if self.opaque {
                if !matches!(*b, b'\r' | b'\n') {
                    *b = b'x';
                }
                continue;
            }
            match *b {
                b'\n' => {
                    if self.line_len == 0 {
                        if self.cr {
                            self.done = true;
                        } else {
                            self.opaque = true;
                        }
                    }
                    self.prev_secret = self.secret;
                    self.name.clear();
                    self.in_value = false;
                    self.secret = false;
                    self.line_len = 0;
                    self.cr = false;
                    self.start_line = false;
                    continue;
                }
                b'\r' => {
                    self.cr = true;
                    continue;
                }
                _ => {}
            }
            self.line_len += 1;
            if self.start_line {
                match *b {
                    b' ' => {
                        self.spaces += 1;
                        self.in_query = false;
                    }
                    b'?' if self.spaces == 1 => {
                        self.in_query = true;
                        self.chain = key.start();
                    }
                    b'&' | b'=' if self.in_query => self.chain = key.start(),
                    _ if self.in_query => {
                        self.chain = key.step(self.chain, *b);
                        *b = letter(self.chain);
                    }
                    _ => {}
                }
                continue;
            }
            if self.line_len == 1 && matches!(*b, b' ' | b'\t') && self.prev_secret {
                // An obsolete folded line continues the secret value above it.
                self.in_value = true;
                self.secret = true;
                continue;
            }
            if self.in_value {
                if self.secret && *b != b' ' {
                    self.chain = key.step(self.chain, *b);
                    *b = letter(self.chain);
                }
            } else if *b == b':' {
                self.in_value = true;
                self.secret = SECRET_HEADERS.contains(&self.name.trim_ascii());
                self.chain = key.start();
            } else if self.name.len() < 40 {
                self.name.push(b.to_ascii_lowercase());
            }
        }
    }
}

/// How a body is read for redaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub(super) enum BodyMode {
    /// Not decided yet (the first non-blank byte decides).
    #[default]
    Sniff,
    Json,
    /// Server-sent events: field names, then JSON in `data:` values.
    Sse,
    /// Not JSON: every byte replaced.
    Opaque,
}

/// A container in the JSON being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Container {
    Object,
    Array,
}

/// Where a body's redaction is.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "a lexer's independent flags, each its own state"
)]
pub(super) struct BodyState {
    mode: BodyMode,
    stack: Vec<Container>,
    /// Inside a string: (is it a key, is its value kept, escape pending).
    string: Option<(bool, bool, bool)>,
    /// In an object, the next string is a key (after `{` or `,`).
    expect_key: bool,
    /// The last key read, lowercased, and whether its value is kept.
    key: Vec<u8>,
    keep_value: bool,
    /// Inside a number (digits, `.eE+-` until a delimiter).
    number: bool,
    /// A literal being matched (`true`, `false`, `null`, `DONE`) and the next byte's index.
    #[serde(deserialize_with = "known_literal")]
    literal: Option<(&'static [u8], usize)>,
    /// SSE: at the start of a line / reading the field name.
    sse_field: bool,
    sse_name: Vec<u8>,
    /// SSE: the field's value has not begun (its first byte decides JSON or text).
    sse_value_start: bool,
    /// SSE: the rest of this line is replaced (text, or cut by an uncaptured gap).
    sse_line_opaque: bool,
    chain: u64,
}

const LITERALS: [&[u8]; 4] = [b"true", b"false", b"null", b"DONE"];

/// A literal being matched, read back (a checkpoint): one of [`LITERALS`], or the empty one
/// that marks a mismatch.
fn known_literal<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<(&'static [u8], usize)>, D::Error> {
    let got = <Option<(Vec<u8>, usize)> as serde::Deserialize>::deserialize(d)?;
    got.map(|(bytes, i)| {
        let empty: &'static [u8] = b"";
        LITERALS
            .into_iter()
            .chain([empty])
            .find(|l| **l == bytes[..])
            .map(|l| (l, i))
            .ok_or_else(|| serde::de::Error::custom("unknown literal"))
    })
    .transpose()
}

impl BodyState {
    /// A new body, of a response announced as server-sent events or not.
    pub(super) fn reset(&mut self, sse: bool) {
        *self = BodyState {
            mode: if sse { BodyMode::Sse } else { BodyMode::Sniff },
            sse_field: sse,
            ..BodyState::default()
        };
    }

    /// Bytes of the body went by uncaptured: where the lexer is can no longer be known, so
    /// the rest of the body is replaced (a stream's, up to the end of the current line).
    pub(super) fn gap(&mut self) {
        if self.mode == BodyMode::Sse {
            self.sse_line_opaque = true;
        } else {
            self.mode = BodyMode::Opaque;
        }
    }

    /// Redacts body bytes in place: runs the state allows in bulk (the inside of a string, an
    /// opaque body), every other byte through the lexer. Same bytes out as [`Self::byte`] on
    /// each: the bulk paths do what it would do to every byte of the run.
    pub(super) fn redact(&mut self, key: Key, data: &mut [u8]) {
        let mut i = 0;
        while let Some(rest) = data.get_mut(i..).filter(|r| !r.is_empty()) {
            let n = self.run(key, rest);
            if n > 0 {
                i += n;
            } else {
                self.byte(key, &mut rest[0]);
                i += 1;
            }
        }
    }

    /// Bytes at the start of `rest` handled in bulk; 0 when the next one needs the lexer.
    fn run(&mut self, key: Key, rest: &mut [u8]) -> usize {
        match self.mode {
            BodyMode::Opaque => {
                for b in rest.iter_mut() {
                    if !matches!(*b, b'\r' | b'\n') {
                        *b = b'x';
                    }
                }
                return rest.len();
            }
            BodyMode::Sse if self.sse_field => return self.sse_data_field(rest),
            BodyMode::Sse if self.sse_value_start || self.sse_line_opaque => return 0,
            BodyMode::Sniff => return 0,
            BodyMode::Sse | BodyMode::Json => {}
        }
        match self.string {
            Some((_, _, false)) => self.string_run(key, rest),
            None if !self.number && self.literal.is_none() => self.structure(key, rest),
            // An escape pending, a number or a literal: the lexer's.
            _ => 0,
        }
    }

    /// A stream line that starts with `data:`: the field name as the lexer takes it (every
    /// prefix of `data` is a known field, so nothing is replaced), up to its value.
    fn sse_data_field(&mut self, rest: &[u8]) -> usize {
        if !self.sse_name.is_empty() || !rest.starts_with(b"data:") {
            return 0;
        }
        self.sse_name.extend_from_slice(b"data");
        self.sse_field = false;
        self.sse_value_start = true;
        5
    }

    /// Inside a string, no escape pending: up to its closing quote, an escape or a line break
    /// (which ends an SSE line), every byte is string content.
    fn string_run(&mut self, key: Key, rest: &mut [u8]) -> usize {
        let Some((is_key, kept, false)) = self.string else {
            return 0;
        };
        let n = rest
            .iter()
            .position(|&b| matches!(b, b'"' | b'\\' | b'\n' | b'\r'))
            .unwrap_or(rest.len());
        let run = &mut rest[..n];
        let replace = if is_key {
            let room = KEY_MAX.saturating_sub(self.key.len()).min(n);
            self.key.extend_from_slice(&run[..room]);
            self.stack.len() > DEPTH_KEPT
        } else {
            !kept
        };
        if replace {
            for b in run {
                self.chain = key.step(self.chain, *b);
                *b = letter(self.chain);
            }
        }
        n
    }

    /// Between tokens (no string, number or literal open): structure, blanks and whole
    /// strings in one loop, doing to each byte what [`Self::json`] does. Stops at a byte it
    /// leaves to the lexer (a number, a literal, an escape, a line break in a stream, a byte
    /// that is not JSON) and says how many it took. The per-byte dispatch is what a streamed
    /// event's redaction spent most of its time on.
    fn structure(&mut self, key: Key, rest: &mut [u8]) -> usize {
        let sse = self.mode == BodyMode::Sse;
        let mut i = 0;
        while let Some(&b) = rest.get(i) {
            if self.punctuation(b) {
                i += 1;
                continue;
            }
            match b {
                b' ' | b'\t' => {}
                b'\r' | b'\n' if !sse => {}
                b'"' => {
                    self.open_string(key);
                    i += 1;
                    i += self.string_run(key, &mut rest[i..]);
                    if rest.get(i) != Some(&b'"') {
                        // An escape, a line break or the end of the piece: the lexer's.
                        return i;
                    }
                    self.close_string();
                }
                _ => return i,
            }
            i += 1;
        }
        i
    }

    /// JSON's punctuation outside a string (`{}[],:`): the nesting, and whether the next
    /// string is a key. False for any other byte.
    fn punctuation(&mut self, b: u8) -> bool {
        match b {
            b'{' => {
                self.stack.push(Container::Object);
                self.expect_key = true;
            }
            b'[' => {
                self.stack.push(Container::Array);
                self.expect_key = false;
            }
            b'}' | b']' => {
                self.stack.pop();
                self.expect_key = false;
            }
            b',' => self.expect_key = self.stack.last() == Some(&Container::Object),
            b':' => self.expect_key = false,
            _ => return false,
        }
        true
    }

    /// An opening quote outside a string: a key or a value, kept or not.
    fn open_string(&mut self, key: Key) {
        let last = self.stack.last();
        let in_array = last == Some(&Container::Array) || self.stack.len() > DEPTH_KEPT;
        let is_key = self.expect_key && last == Some(&Container::Object);
        if is_key {
            self.key.clear();
        }
        let kept = !is_key && !in_array && self.keep_value;
        if !is_key {
            // A kept key's value is this one string, not the next.
            self.keep_value = false;
        }
        self.chain = key.start();
        self.string = Some((is_key, kept, false));
        self.expect_key = false;
    }

    /// A string's closing quote; a key decides whether the value after it is kept.
    fn close_string(&mut self) {
        if let Some((true, _, _)) = self.string {
            self.keep_value = KEPT_VALUES.contains(&self.key.as_slice());
        }
        self.string = None;
    }

    fn byte(&mut self, key: Key, b: &mut u8) {
        match self.mode {
            BodyMode::Sniff => match *b {
                b' ' | b'\t' | b'\r' | b'\n' => return,
                b'{' | b'[' => self.mode = BodyMode::Json,
                _ => {
                    self.mode = BodyMode::Opaque;
                    *b = b'x';
                    return;
                }
            },
            BodyMode::Opaque => {
                if !matches!(*b, b'\r' | b'\n') {
                    *b = b'x';
                }
                return;
            }
            BodyMode::Sse => {
                if *b == b'\n' || *b == b'\r' {
                    // Each event line stands alone: a cut one must not spill into the next.
                    self.sse_field = true;
                    self.sse_name.clear();
                    self.stack.clear();
                    self.string = None;
                    self.number = false;
                    self.literal = None;
                    self.keep_value = false;
                    self.expect_key = false;
                    self.sse_line_opaque = false;
                    return;
                }
                if self.sse_line_opaque {
                    *b = b'x';
                    return;
                }
                if self.sse_field {
                    if *b == b':' {
                        self.sse_field = false;
                        self.sse_value_start = true;
                        return;
                    }
                    self.sse_name.push(*b);
                    if !matches!(
                        self.sse_name.as_slice(),
                        b"d" | b"da"
                            | b"dat"
                            | b"data"
                            | b"e"
                            | b"ev"
                            | b"eve"
                            | b"even"
                            | b"event"
                            | b"i"
                            | b"id"
                            | b"r"
                            | b"re"
                            | b"ret"
                            | b"retr"
                            | b"retry"
                    ) {
                        *b = b'x';
                    }
                    return;
                }
            }
            BodyMode::Json => {}
        }
        if self.mode == BodyMode::Sse && self.sse_value_start {
            match *b {
                b' ' | b'\t' => return,
                b'{' | b'[' => self.sse_value_start = false,
                _ => {
                    // Not JSON (plain text, a comment): the line is replaced.
                    self.sse_value_start = false;
                    self.sse_line_opaque = true;
                    *b = b'x';
                    return;
                }
            }
        }
        self.json(key, b);
    }

    fn json(&mut self, key: Key, b: &mut u8) {
        if let Some((is_key, kept, escape)) = self.string {
            if escape {
                self.string = Some((is_key, kept, false));
            } else if *b == b'"' {
                self.close_string();
                return;
            } else if *b == b'\\' {
                self.string = Some((is_key, kept, true));
            }
            if is_key {
                if self.key.len() < KEY_MAX {
                    self.key.push(*b);
                }
                if self.stack.len() > DEPTH_KEPT {
                    // Keys below the depth attribution reads are data (tool arguments, metadata).
                    self.chain = key.step(self.chain, *b);
                    *b = letter(self.chain);
                }
            } else if !kept {
                self.chain = key.step(self.chain, *b);
                *b = letter(self.chain);
            }
            return;
        }
        // Numbers are kept only as a key's own value within the depth attribution reads
        // (`max_tokens`, usage counts); in arrays (token ids) and deeper they are data.
        let in_array =
            self.stack.last() == Some(&Container::Array) || self.stack.len() > DEPTH_KEPT;
        if self.number {
            match *b {
                b'0'..=b'9' => {
                    if in_array {
                        self.chain = key.step(self.chain, *b);
                        *b = digit(self.chain);
                    }
                    return;
                }
                b'.' | b'e' | b'E' | b'+' | b'-' => return,
                _ => self.number = false,
            }
        }
        if let Some((lit, i)) = self.literal {
            if b.is_ascii_alphabetic() {
                if lit.get(i) == Some(b) {
                    self.literal = Some((lit, i + 1));
                } else {
                    self.literal = Some((b"", usize::MAX));
                    *b = b'x';
                }
                return;
            }
            self.literal = None;
        }
        if self.punctuation(*b) {
            return;
        }
        match *b {
            b'"' => self.open_string(key),
            b'-' | b'0'..=b'9' => {
                self.number = true;
                self.chain = key.start();
                if in_array && b.is_ascii_digit() {
                    self.chain = key.step(self.chain, *b);
                    *b = digit(self.chain);
                }
            }
            c if c.is_ascii_alphabetic() => {
                if let Some(l) = LITERALS.iter().find(|l| l[0] == c) {
                    self.literal = Some((l, 1));
                } else {
                    self.literal = Some((b"", usize::MAX));
                    *b = b'x';
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => *b = b'x',
        }
    }
}

#[cfg(test)]
mod tests;
