//! The privilege check that comes before anything else: without it, the first failure a
//! non-root user meets is a misleading one ("no process listens on TCP port N": the port's
//! owner is only hidden from them).

use super::DaemonError;

/// A capability bit (`linux/capability.h`).
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What the daemon needs, each as alternatives (any one of them will do).
const NEEDS: [(&str, &[u32]); 4] = [
    ("CAP_BPF", &[CAP_BPF, CAP_SYS_ADMIN]),
    ("CAP_PERFMON", &[CAP_PERFMON, CAP_SYS_ADMIN]),
    ("CAP_SYS_PTRACE", &[CAP_SYS_PTRACE]),
    ("CAP_DAC_READ_SEARCH", &[CAP_DAC_READ_SEARCH]),
];

/// Fails, naming what is missing, unless this process holds every capability it needs.
pub fn check() -> Result<(), DaemonError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing(effective(&status));
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

/// The effective capability set from `/proc/self/status` (empty when it cannot be read).
fn effective(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

fn missing(eff: u64) -> Vec<&'static str> {
    NEEDS
        .iter()
        .filter(|(_, any)| !any.iter().any(|&c| eff & (1 << c) != 0))
        .map(|(name, _)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_capability() {
        assert_eq!(
            missing(effective("Name:\tx\nCapEff:\t0000000000000000\n")),
            [
                "CAP_BPF",
                "CAP_PERFMON",
                "CAP_SYS_PTRACE",
                "CAP_DAC_READ_SEARCH"
            ]
        );
        // Root's full set, and CAP_SYS_ADMIN standing in for the BPF pair.
        assert!(missing(effective("CapEff:\t000001ffffffffff\n")).is_empty());
        let admin = (1u64 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE) | (1 << CAP_DAC_READ_SEARCH);
        assert!(missing(admin).is_empty());
        assert_eq!(
            missing(1 << CAP_BPF),
            ["CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
        );
    }
}
