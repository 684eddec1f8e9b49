//! An OpenAI-style `usage` object read straight into its counts: no `serde_json::Value` tree
//! (a map and a string per key) for the three numbers a whole JSON response is read for.
//!
//! As lenient as reading it through a `Value` was: a count that is not a non-negative integer
//! (a float, a string, `null`) reads as absent without failing the object, a repeated key's
//! last value wins, unknown keys are skipped.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Visitor methods for the kinds of JSON value a field reads as absent (`$absent`); arrays are
/// skipped whole.
macro_rules! absent_otherwise {
    ($ty:ty, $absent:expr) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<$ty, E> {
            Ok($absent)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<$ty, E> {
            Ok($absent)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<$ty, E> {
            Ok($absent)
        }
        fn visit_unit<E: de::Error>(self) -> Result<$ty, E> {
            Ok($absent)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<$ty, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($absent)
        }
    };
}

/// Token counts reported by the server.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[expect(
    clippy::struct_field_names,
    reason = "the names of `Lifecycle::Usage` and of the servers' own fields"
)]
pub(super) struct Usage {
    pub(super) prompt_tokens: Option<u64>,
    pub(super) completion_tokens: Option<u64>,
    pub(super) cached_tokens: Option<u64>,
}

/// A `usage` object as the server wrote it, read leniently into its [`Usage`] (the derived
/// `Deserialize` is the strict one, for the tracker's own state).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct UsageObject(pub(super) Usage);

impl<'de> Deserialize<'de> for UsageObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(UsageVisitor)
    }
}

struct UsageVisitor;

impl<'de> Visitor<'de> for UsageVisitor {
    type Value = UsageObject;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a usage object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageObject, A::Error> {
        let mut u = Usage::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Prompt => u.prompt_tokens = map.next_value::<Count>()?.0,
                Key::Completion => u.completion_tokens = map.next_value::<Count>()?.0,
                Key::Details => u.cached_tokens = map.next_value::<Details>()?.0,
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(UsageObject(u))
    }
}

/// The keys read; any other is skipped (compared, never allocated).
enum Key {
    Prompt,
    Completion,
    Details,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "prompt_tokens" => Key::Prompt,
                    "completion_tokens" => Key::Completion,
                    "prompt_tokens_details" => Key::Details,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// A count: a non-negative integer, else absent.
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CountVisitor)
    }
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token count")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
        Ok(Count(Some(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
        Ok(Count(u64::try_from(v).ok()))
    }
    absent_otherwise!(Count, Count(None));
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }
}

/// `prompt_tokens_details`: its `cached_tokens` when it is an object, else absent.
struct Details(Option<u64>);

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Details;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("usage details")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Details, A::Error> {
                let mut cached = None;
                while let Some(key) = map.next_key::<DetailsKey>()? {
                    if key.0 {
                        cached = map.next_value::<Count>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Details(cached))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Details, E> {
                Ok(Details(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Details, E> {
                Ok(Details(None))
            }
            absent_otherwise!(Details, Details(None));
        }
        d.deserialize_any(V)
    }
}

/// Whether a details key is `cached_tokens`.
struct DetailsKey(bool);

impl<'de> Deserialize<'de> for DetailsKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DetailsKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<DetailsKey, E> {
                Ok(DetailsKey(k == "cached_tokens"))
            }
        }
        d.deserialize_identifier(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What reading through a `Value` gave (the reference this replaces).
    fn through_value(s: &str) -> Option<UsageObject> {
        let v: serde_json::Value = serde_json::from_str(s).ok()?;
        Some(UsageObject(Usage {
            prompt_tokens: v["prompt_tokens"].as_u64(),
            completion_tokens: v["completion_tokens"].as_u64(),
            cached_tokens: v["prompt_tokens_details"]["cached_tokens"].as_u64(),
        }))
    }

    #[test]
    fn reads_what_a_value_tree_read() {
        for s in [
            r#"{"prompt_tokens":14,"completion_tokens":4,"total_tokens":18}"#,
            r#"{"completion_tokens":4,"prompt_tokens":14,"prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0}}"#,
            r#"{"prompt_tokens":1.5,"completion_tokens":"4","prompt_tokens_details":null}"#,
            r#"{"prompt_tokens":-3,"completion_tokens":null,"prompt_tokens_details":[1,2]}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2,"extra":{"a":[{"b":1}]},"completion_tokens":true}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":{"x":1}},"completion_tokens":[7]}"#,
            r#"{"prompt_tokens_details":"none","prompt_tokens":18446744073709551615}"#,
            r#"{"pr\u006fmpt_tokens":5,"completion_tokens":1e2}"#,
            "{}",
        ] {
            let typed = serde_json::from_str::<UsageObject>(s).ok();
            assert_eq!(typed, through_value(s), "{s}");
            // A parsed event's `usage` is read through the same visitors.
            let tree: serde_json::Value = serde_json::from_str(s).expect("valid JSON");
            assert_eq!(UsageObject::deserialize(&tree).ok(), typed, "{s}");
        }
    }

    #[test]
    fn broken_objects_read_as_nothing() {
        for s in [
            r#"{"prompt_tokens":14,"#,
            "[1,2]",
            r#"{"prompt_tokens" 1}"#,
            "",
        ] {
            assert!(serde_json::from_str::<UsageObject>(s).is_err(), "{s}");
        }
    }
}
