//! Token accounting of the emulation: prompt tokens and prefix-cache blocks.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// Characters per emulated token.
pub const CHARS_PER_TOKEN: usize = 4;
/// Tokens per prefix-cache block (vLLM's default block size).
pub const BLOCK_TOKENS: usize = 16;
/// Characters per prefix-cache block.
pub const BLOCK_CHARS: usize = BLOCK_TOKENS * CHARS_PER_TOKEN;

/// Prompt tokens of `text`: `ceil(chars / 4)`, at least 1 (an engine always runs one token).
pub fn prompt_tokens(text: &str) -> u32 {
    let chars = text.chars().count();
    u32::try_from(chars.div_ceil(CHARS_PER_TOKEN))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Chained hashes of the whole blocks of `text`: element `k` identifies the prefix made of
/// blocks `0..=k` (the first `(k + 1) * 64` characters), so equal hashes mean equal prefixes.
pub fn block_hashes(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut prev = 0u64;
    let mut start = 0usize;
    let mut n = 0usize;
    for (i, c) in text.char_indices() {
        n += 1;
        if n == BLOCK_CHARS {
            let end = i + c.len_utf8();
            let mut h = DefaultHasher::new();
            prev.hash(&mut h);
            text[start..end].hash(&mut h);
            prev = h.finish();
            out.push(prev);
            start = end;
            n = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_up() {
        assert_eq!(prompt_tokens(""), 1);
        assert_eq!(prompt_tokens("abcd"), 1);
        assert_eq!(prompt_tokens("abcde"), 2);
        assert_eq!(prompt_tokens("ééééé"), 2);
    }

    #[test]
    fn blocks_are_prefix_hashes() {
        let a = "x".repeat(200);
        let mut b = "x".repeat(130);
        b.push_str(&"y".repeat(70));
        let ha = block_hashes(&a);
        let hb = block_hashes(&b);
        assert_eq!(ha.len(), 3);
        assert_eq!(hb.len(), 3);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        assert!(block_hashes("short").is_empty());
    }
}
