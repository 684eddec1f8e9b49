//! A prompt's start as hashed blocks, so the ledger can tell which part of a prompt other
//! requests shared (engines cache shared prefixes and compute only the rest: vLLM and `SGLang`
//! by blocks of tokens, llama.cpp by slot). Only hashes leave the tracker, never prompt text.
//!
//! Blocks start at the body's prompt key (`"messages"`, `"prompt"`, `"inputs"`, `"input"`), so
//! keys a client puts before it (`"stream"`, `"model"`) do not break a shared prefix, and each
//! block's hash covers every byte before it in the prompt (chained), so equal hashes mean an
//! equal start. Only whole blocks within the captured head are hashed.

use std::{hash::Hasher as _, sync::LazyLock};

use memchr::memmem;

/// Bytes per block: about 16 tokens, the block size of vLLM's prefix cache.
pub const BLOCK_BYTES: usize = 64;

/// Keys a prompt can be under, most specific first (searchers built once: one per request
/// body otherwise).
static PROMPT_KEYS: LazyLock<[memmem::Finder<'static>; 4]> = LazyLock::new(|| {
    [
        b"\"messages\"".as_slice(),
        b"\"prompt\"",
        b"\"inputs\"",
        b"\"input\"",
    ]
    .map(memmem::Finder::new)
});

/// The chained hashes of the whole blocks of the prompt in `body_head` (empty without one).
pub(super) fn prompt_blocks(body_head: &[u8]) -> Vec<u64> {
    let Some(start) = PROMPT_KEYS.iter().find_map(|k| k.find(body_head)) else {
        return Vec::new();
    };
    let mut prev = 0u64;
    body_head[start..]
        .chunks_exact(BLOCK_BYTES)
        .map(|block| {
            let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
            h.write_u64(prev);
            h.write(block);
            prev = h.finish();
            prev
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(head: &str, system: &str, user: &str) -> Vec<u8> {
        format!(
            r#"{{{head}"messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{user}"}}]}}"#
        )
        .into_bytes()
    }

    #[test]
    fn a_shared_system_prompt_gives_equal_leading_blocks() {
        let system = "You are a careful assistant. ".repeat(20);
        let (x, y) = (
            body(
                r#""model":"m","stream":true,"#,
                &system,
                &"hello there. ".repeat(9),
            ),
            body(
                r#""stream":false,"#,
                &system,
                &"what is the time? ".repeat(8),
            ),
        );
        let (a, b) = (prompt_blocks(&x), prompt_blocks(&y));
        let shared = a.iter().zip(&b).take_while(|(p, q)| p == q).count();
        // Every whole block of the bytes both prompts begin with, from the key on, and no more.
        let key = |v: &[u8]| memmem::find(v, b"\"messages\"").unwrap_or(0);
        let (px, py) = (&x[key(&x)..], &y[key(&y)..]);
        let common = px.iter().zip(py).take_while(|(p, q)| p == q).count();
        assert!(common > system.len());
        assert_eq!(shared, common / BLOCK_BYTES);
        assert!(a.len() > shared && b.len() > shared);
    }

    #[test]
    fn a_change_early_in_the_prompt_changes_every_later_block() {
        let a = prompt_blocks(&body("", &"x".repeat(400), "u"));
        let b = prompt_blocks(&body("", &format!("y{}", "x".repeat(399)), "u"));
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
    }

    #[test]
    fn no_prompt_key_no_blocks() {
        assert!(prompt_blocks(br#"{"model":"m","stream":true}"#).is_empty());
        assert!(prompt_blocks(b"").is_empty());
    }
}
