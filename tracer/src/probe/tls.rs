//! TLS plaintext: uprobes on OpenSSL's read and write calls, attached per (library, process)
//! to the `libssl` a target maps or a binary that exports the symbols (OpenSSL linked
//! statically). The programs (`tracer-ebpf/src/probes/tls.rs`) emit the plaintext as data
//! records of the socket under the call.

use std::path::Path;

use super::{
    ProbeError, Probes,
    uprobes::{Family, Site},
};
use crate::ids::Pid;

/// The OpenSSL symbols hooked: an entry program and the shared return program on each read
/// and write, and `SSL_free` (its socket forgotten).
pub const TLS_SYMBOLS: &[(&str, &str)] = &[
    ("SSL_read", "ssl_read"),
    ("SSL_read", "ssl_return"),
    ("SSL_read_ex", "ssl_read_ex"),
    ("SSL_read_ex", "ssl_return"),
    ("SSL_write", "ssl_write"),
    ("SSL_write", "ssl_return"),
    ("SSL_write_ex", "ssl_write_ex"),
    ("SSL_write_ex", "ssl_return"),
    ("SSL_free", "ssl_free"),
];

static TLS: Family = Family {
    name: "TLS",
    symbols: TLS_SYMBOLS,
    programs: &[
        "ssl_read",
        "ssl_read_ex",
        "ssl_write",
        "ssl_write_ex",
        "ssl_return",
        "ssl_free",
    ],
};

impl Probes {
    /// Attaches the TLS uprobes to every OpenSSL read/write symbol `library` (a `libssl`, or
    /// an executable exporting them) has, for `pid` (or every process when `None`: then only
    /// OpenSSL's socket BIO is read, as no process is marked for memory BIOs). Returns how many
    /// were attached; the same (library, process) twice is a no-op that returns 0.
    pub fn attach_tls(&mut self, library: &Path, pid: Option<Pid>) -> Result<usize, ProbeError> {
        let n = self.attach_family(&TLS, library, pid)?;
        // Its socket reads are remembered from now on (memory BIOs; `TARGET_TLS`).
        if let Some(p) = pid {
            self.add_target(p.0, tracer_ebpf::abi::TARGET_TLS)?;
        }
        Ok(n)
    }

    /// Detaches the TLS uprobes from a process (every library). Returns how many.
    pub fn detach_tls(&mut self, pid: Pid) -> Result<usize, ProbeError> {
        self.detach_family(&TLS, pid)
    }

    /// The (library, process) pairs the TLS uprobes are attached to.
    pub fn tls_attached(&self) -> Vec<Site> {
        self.family_attached(&TLS)
    }
}
