//! The clock shared by the writer and its readers.

/// Microseconds of `CLOCK_MONOTONIC`: the time base of every timestamp in the shared state.
///
/// `CLOCK_MONOTONIC` is system-wide, so timestamps from the engine process and from a process
/// reading through NVML compare directly.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
