//! Counters the pipeline keeps about the records it decodes, next to the kernel's.

use serde::ser::{Serialize, SerializeMap as _, SerializeStruct as _, Serializer};
use tracer_ebpf::abi::Kind;

use crate::probe::decode::{Body, Event};

/// Decoded records by kind, decode failures and socket bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UserStats {
    /// Records decoded, by kind (indexed by `Kind as usize`).
    pub decoded: [u64; 16],
    /// Records that failed to decode.
    pub decode_errors: u64,
    /// Socket bytes reported on traced connections (IPC between members not included), inbound
    /// and outbound.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl UserStats {
    pub(super) fn record(&mut self, ev: &Event<'_>) {
        self.decoded[ev.body.kind() as usize] += 1;
        if let Body::Data {
            inbound,
            total_len,
            ipc: false,
            cont: false,
            ..
        } = ev.body
        {
            if inbound {
                self.bytes_in += total_len;
            } else {
                self.bytes_out += total_len;
            }
        }
    }

    /// Records of `kind` decoded.
    pub fn decoded(&self, kind: Kind) -> u64 {
        self.decoded[kind as usize]
    }

    /// Counter-wise `self - earlier` (counters only grow).
    #[must_use]
    pub fn since(&self, earlier: &UserStats) -> UserStats {
        let mut d = *self;
        for (i, v) in d.decoded.iter_mut().enumerate() {
            *v = v.saturating_sub(earlier.decoded[i]);
        }
        d.decode_errors = d.decode_errors.saturating_sub(earlier.decode_errors);
        d.bytes_in = d.bytes_in.saturating_sub(earlier.bytes_in);
        d.bytes_out = d.bytes_out.saturating_sub(earlier.bytes_out);
        d
    }
}

/// `{"decoded": {kind: n}, "decode_errors": n, "bytes_in": n, "bytes_out": n}`.
impl Serialize for UserStats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Decoded<'a>(&'a UserStats);
        impl Serialize for Decoded<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(Kind::ALL.len()))?;
                for k in Kind::ALL {
                    m.serialize_entry(k.name(), &self.0.decoded(k))?;
                }
                m.end()
            }
        }
        let mut st = s.serialize_struct("UserStats", 4)?;
        st.serialize_field("decoded", &Decoded(self))?;
        st.serialize_field("decode_errors", &self.decode_errors)?;
        st.serialize_field("bytes_in", &self.bytes_in)?;
        st.serialize_field("bytes_out", &self.bytes_out)?;
        st.end()
    }
}

/// The counters as they are, for checkpoints (`Serialize` above is the reports' form).
pub(super) mod raw {
    use serde::{Deserialize as _, Deserializer, Serialize as _, Serializer};

    use super::UserStats;

    pub fn serialize<S: Serializer>(u: &UserStats, s: S) -> Result<S::Ok, S::Error> {
        (u.decoded, u.decode_errors, u.bytes_in, u.bytes_out).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UserStats, D::Error> {
        let (decoded, decode_errors, bytes_in, bytes_out) =
            <([u64; 16], u64, u64, u64)>::deserialize(d)?;
        Ok(UserStats {
            decoded,
            decode_errors,
            bytes_in,
            bytes_out,
        })
    }
}
