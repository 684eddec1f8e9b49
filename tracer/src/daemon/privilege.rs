//! Privileges: the check that comes before anything else (without it, the first failure a
//! non-root user meets is a misleading one: "no process listens on TCP port N", the port's
//! owner being only hidden from them), then giving up everything else.
//!
//! What the daemon keeps for its whole life, and why (each is needed after start, when a new
//! target appears or a re-discovery runs, not only while loading):
//! - `CAP_BPF`: loading the probes, and attaching CUDA and OpenSSL uprobes to new processes;
//! - `CAP_PERFMON`: tracepoints are perf events; RAPL's `power` PMU is read system-wide;
//! - `CAP_SYS_PTRACE`: `/proc/<pid>/{maps,task/*/syscall,root}` of processes of other users
//!   (which libraries a server mapped, a read it is blocked in, the files in its namespace);
//! - `CAP_DAC_READ_SEARCH`: `/proc/<pid>/fd` of processes of other users (their sockets and
//!   device nodes), and libraries in directories only their owner can read;
//! - `CAP_SYS_ADMIN`, only while a uprobe step clock is on (`probe.cuda_clock`,
//!   `probe.tls_uprobes`) or IPC peers are followed into other network namespaces
//!   (`probe.other_netns_peers`): the kernel creates a uprobe perf event for `CAP_SYS_ADMIN`
//!   only (`perf_uprobe_event_init`; `CAP_PERFMON` was enough from 5.8 until the 2025 fix of
//!   the probes' permission checks, backported to stable kernels), and a server's `libcuda` or
//!   `libssl` is only known once it has started; `setns` into a container's network namespace
//!   (to list its Unix sockets) needs it too.
//!
//! Everything else goes, from every set (bounding included), before the first thread starts:
//! capabilities are per thread, and threads inherit their creator's. No-new-privs is set, so
//! nothing the daemon might execute regains them. Root stays root (uid 0 owns the state
//! directory and reads root-owned sysfs files), but without `CAP_DAC_OVERRIDE` it can no longer
//! write what it does not own, nor kill, mount, load modules or change identity.

use caps::{CapSet, Capability, CapsHashSet};

use super::DaemonError;

/// What the daemon keeps (see the module's documentation).
const KEEP: [Capability; 4] = [
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Kept too while uprobes may be attached to processes found later, or other network
/// namespaces joined.
const KEEP_FOR_UPROBES: Capability = Capability::CAP_SYS_ADMIN;

/// What [`drop_unneeded`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Kept (the intersection of [`KEEP`] and what the process had).
    pub kept: Vec<String>,
    /// How many permitted capabilities were given up.
    pub dropped: usize,
    /// Whether the bounding set was cut too (it needs `CAP_SETPCAP`; under a unit whose
    /// `CapabilityBoundingSet` already limits it, it is not there).
    pub bounding: bool,
}

/// Gives up every capability but [`KEEP`] (and [`KEEP_FOR_UPROBES`] when `uprobes`), from the
/// bounding, inheritable, ambient, permitted and effective sets of this thread (call it while
/// it is the only one), and sets no-new-privs.
pub fn drop_unneeded(uprobes: bool) -> Result<Dropped, DaemonError> {
    let fail = |what: &'static str| {
        move |e: caps::errors::CapsError| DaemonError::Io {
            what: format!("dropping privileges: {what}"),
            source: std::io::Error::other(e.to_string()),
        }
    };
    let permitted = caps::read(None, CapSet::Permitted).map_err(fail("reading"))?;
    // `CAP_SYS_ADMIN` stands in for the BPF pair where a runtime grants it without them (the
    // privilege check accepts that): then it is kept, or loading would fail.
    let stands_in =
        !permitted.contains(&Capability::CAP_BPF) || !permitted.contains(&Capability::CAP_PERFMON);
    let keep: CapsHashSet = KEEP
        .iter()
        .copied()
        .chain((uprobes || stands_in).then_some(KEEP_FOR_UPROBES))
        .filter(|c| permitted.contains(c))
        .collect();
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(DaemonError::Io {
            what: "dropping privileges: no-new-privs".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // The bounding set first: dropping from it needs `CAP_SETPCAP`, which goes below.
    let bounding = permitted.contains(&Capability::CAP_SETPCAP);
    if bounding {
        for cap in caps::all() {
            if !keep.contains(&cap)
                && caps::has_cap(None, CapSet::Bounding, cap).map_err(fail("bounding"))?
            {
                caps::drop(None, CapSet::Bounding, cap).map_err(fail("bounding"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(fail("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(fail("inheritable"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(fail("effective"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(fail("permitted"))?;
    let mut kept: Vec<String> = keep.iter().map(ToString::to_string).collect();
    kept.sort();
    Ok(Dropped {
        kept,
        dropped: permitted.len() - keep.len(),
        bounding,
    })
}

/// How many threads this process has (`/proc/self/task`): capabilities are dropped per thread,
/// so the drop must come while there is one.
pub fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// What the daemon needs, each as alternatives (any one of them will do): `CAP_SYS_ADMIN`
/// stands in for the BPF pair on runtimes that grant it alone.
const NEEDS: [(Capability, &[Capability]); 4] = [
    (
        Capability::CAP_BPF,
        &[Capability::CAP_BPF, Capability::CAP_SYS_ADMIN],
    ),
    (
        Capability::CAP_PERFMON,
        &[Capability::CAP_PERFMON, Capability::CAP_SYS_ADMIN],
    ),
    (Capability::CAP_SYS_PTRACE, &[Capability::CAP_SYS_PTRACE]),
    (
        Capability::CAP_DAC_READ_SEARCH,
        &[Capability::CAP_DAC_READ_SEARCH],
    ),
];

/// Fails, naming what is missing, unless this process holds every capability it needs.
pub fn check() -> Result<(), DaemonError> {
    // Unreadable: nothing held, so every need is named.
    let effective = caps::read(None, CapSet::Effective).unwrap_or_default();
    let missing = missing(&effective);
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    Err(DaemonError::Privilege {
        uid,
        missing: missing.join(", "),
    })
}

fn missing(effective: &CapsHashSet) -> Vec<String> {
    NEEDS
        .iter()
        .filter(|(_, any)| !any.iter().any(|c| effective.contains(c)))
        .map(|(name, _)| name.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_capability() {
        let set = |caps: &[Capability]| caps.iter().copied().collect::<CapsHashSet>();
        assert_eq!(
            missing(&set(&[])),
            [
                "CAP_BPF",
                "CAP_PERFMON",
                "CAP_SYS_PTRACE",
                "CAP_DAC_READ_SEARCH"
            ]
        );
        // Root's full set, and `CAP_SYS_ADMIN` standing in for the BPF pair.
        assert!(missing(&caps::all()).is_empty());
        let admin = set(&[
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_DAC_READ_SEARCH,
        ]);
        assert!(missing(&admin).is_empty());
        assert_eq!(
            missing(&set(&[Capability::CAP_BPF])),
            ["CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
        );
    }
}
