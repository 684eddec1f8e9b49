//! Typed keys. A `u32` can be a process, a service or a device; maps keyed by these newtypes
//! say which, and the compiler checks it. All serialize as their bare number, so recordings and
//! records keep their format.

use serde::{Deserialize, Serialize};

/// A power-measured device (GPU, CPU package, DRAM domain), numbered by the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub u32);

/// A service: the set of processes serving one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceId(pub u32);

impl ServiceId {
    /// The pseudo-service holding the host's CPU time that no traced service explains: other
    /// processes on the host. It never has requests (`occupancy/binding/cputime.rs`).
    pub const OTHER_PROCESSES: ServiceId = ServiceId(u32::MAX - 1);
}

/// A request, as minted by the daemon (cheap to copy and hash; the server's own id travels in
/// the ledger's `Arrival::external_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// A process id (the kernel's tgid), or a thread id where a thread is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Pid(pub u32);

impl std::fmt::Display for Pid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
