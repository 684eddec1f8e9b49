//! The probes' own counters (records emitted and dropped per kind, full tables, truncations),
//! summed over CPUs.

use serde::ser::{Serialize, SerializeMap as _, Serializer};
use tracer_ebpf::abi::{Kind, STAT_SLOTS, Stat};

/// A snapshot of the probes' counters, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelStats {
    pub(super) slots: [u64; STAT_SLOTS as usize],
}

impl Default for KernelStats {
    fn default() -> Self {
        Self {
            slots: [0; STAT_SLOTS as usize],
        }
    }
}

impl KernelStats {
    /// Records of `kind` written to the ring buffer.
    pub fn emitted(&self, kind: Kind) -> u64 {
        self.slots[kind.emitted_stat() as usize]
    }

    /// Records of `kind` lost because the ring buffer was full.
    pub fn dropped(&self, kind: Kind) -> u64 {
        self.slots[kind.dropped_stat() as usize]
    }

    /// Records lost of any kind.
    pub fn dropped_total(&self) -> u64 {
        Kind::ALL.iter().map(|&k| self.dropped(k)).sum()
    }

    /// One of the other counters.
    pub fn get(&self, stat: Stat) -> u64 {
        self.slots[stat as usize]
    }

    /// Counter-wise difference `self - earlier` (counters only grow).
    #[must_use]
    pub fn since(&self, earlier: &KernelStats) -> KernelStats {
        let mut slots = [0u64; STAT_SLOTS as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            *slot = self.slots[i].saturating_sub(earlier.slots[i]);
        }
        KernelStats { slots }
    }
}

/// `{"emitted": {kind: n}, "dropped": {kind: n}, "<counter>": n, ...}`, kinds and counters by
/// name.
impl Serialize for KernelStats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct PerKind<'a>(&'a KernelStats, fn(&KernelStats, Kind) -> u64);
        impl Serialize for PerKind<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(Kind::ALL.len()))?;
                for k in Kind::ALL {
                    m.serialize_entry(k.name(), &(self.1)(self.0, k))?;
                }
                m.end()
            }
        }
        let mut m = s.serialize_map(Some(2 + Stat::ALL.len()))?;
        m.serialize_entry("emitted", &PerKind(self, KernelStats::emitted))?;
        m.serialize_entry("dropped", &PerKind(self, KernelStats::dropped))?;
        for st in Stat::ALL {
            m.serialize_entry(st.name(), &self.get(st))?;
        }
        m.end()
    }
}
