//! What the host must offer, checked at start so that an old kernel gets one clear sentence
//! instead of a verifier or `EINVAL` error from deep inside loading.

use std::path::Path;

use super::DaemonError;

/// The oldest kernel the daemon runs on: the probes walk a write's iovec with `bpf_loop`
/// (5.17); `CAP_BPF`, `CAP_PERFMON` and the BPF ring buffer came in 5.8, and from 5.11 BPF
/// memory is charged to the memory cgroup (no `RLIMIT_MEMLOCK`, no `CAP_SYS_RESOURCE`). Tested
/// on 6.18.
pub const MIN_KERNEL: (u32, u32) = (5, 17);

/// The kernel's own type information: the probes do not relocate against it (they walk no
/// kernel structures), but distribution kernels without it are untested.
const BTF: &str = "/sys/kernel/btf/vmlinux";

/// `major.minor` of a kernel release string (`6.18.44-fc-v1272` -> (6, 18)).
fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// This kernel's release (`uname -r`).
fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Fails on a kernel older than [`MIN_KERNEL`]; warns when the kernel has no BTF.
pub fn check() -> Result<(), DaemonError> {
    let release = release();
    match version(&release) {
        Some(v) if v < MIN_KERNEL => {
            return Err(DaemonError::Kernel {
                release,
                need: format!("{}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
            });
        }
        Some(_) => {}
        None => tracing::warn!("kernel release {release:?} not understood; trying anyway"),
    }
    if !Path::new(BTF).exists() {
        tracing::warn!(
            "{BTF} is missing: this kernel was built without BTF, which tracer is not tested on"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_major_and_minor_from_a_release() {
        assert_eq!(version("6.18.44-fc-v1272"), Some((6, 18)));
        assert_eq!(version("5.10.0-28-amd64"), Some((5, 10)));
        assert_eq!(version("4.18.0-553.el8_10.x86_64"), Some((4, 18)));
        assert_eq!(version("garbage"), None);
        assert!(version("5.15.0-91-generic").is_some_and(|v| v < MIN_KERNEL));
        assert!(version("5.17.1").is_some_and(|v| v >= MIN_KERNEL));
        assert!(version("6.1.0").is_some_and(|v| v >= MIN_KERNEL));
    }
}
