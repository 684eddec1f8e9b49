//! The JSON-lines protocol between the API process and the engine process.

use serde::{Deserialize, Serialize};

/// API → engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToEngine {
    /// A new request.
    Submit {
        /// Request number assigned by the API process (`cmpl-<rid>`).
        rid: u64,
        /// The client's `X-Request-Id`, if any.
        request_id: Option<String>,
        /// Prompt text (chat: the concatenated message contents).
        prompt: String,
        /// Tokens to generate.
        max_tokens: u32,
        /// When the API process received the request, µs of `CLOCK_MONOTONIC`.
        arrive_us: u64,
    },
    /// The client went away: stop generating for `rid`.
    Cancel {
        /// Request number.
        rid: u64,
    },
    /// Stop the engine.
    Shutdown,
}

/// Token counts reported when a request finishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
}

/// Engine → API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum FromEngine {
    /// The engine is initialised (devices opened, sensors running).
    Ready {
        /// The engine's pid.
        pid: u32,
    },
    /// One engine step's output, sent in one write once the step's compute has ended (also
    /// when it emitted nothing, e.g. a step that only prefilled a chunk).
    Step {
        /// Step number, from 1.
        step: u64,
        /// `(rid, text)` of every token the step generated, in batch order.
        tokens: Vec<(u64, String)>,
        /// `(rid, usage)` of the requests that finished in the step; no more events for them.
        done: Vec<(u64, Usage)>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_message_shape() {
        let m = FromEngine::Step {
            step: 3,
            tokens: vec![(1, "tok ".to_owned())],
            done: vec![(1, Usage::default())],
        };
        let s = serde_json::to_string(&m).expect("serialise");
        assert!(
            s.starts_with(r#"{"ev":"step","step":3,"tokens":[[1,"tok "]],"done":[[1,{"#),
            "{s}"
        );
        assert_eq!(serde_json::from_str::<FromEngine>(&s).expect("parse"), m);
    }
}
