//! NVML's timestamps (µs; wall-clock on real drivers, monotonic on emulations) converted to
//! `CLOCK_MONOTONIC`, the probes' clock.

/// Power stamps further than this from both clocks are not trusted.
pub(super) const TRUST_NS: u64 = 1_000_000_000;
/// Utilisation samples older than this (or stamped on neither clock) are dropped.
pub(super) const UTIL_TRUST_NS: u64 = 60_000_000_000;

/// Which clock NVML's µs stamps were found to be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StampClock {
    Wall,
    Monotonic,
}

/// Converts an NVML stamp (µs; wall-clock on real drivers, monotonic on emulations) to
/// `CLOCK_MONOTONIC` ns, given both clocks read at about the same moment. `None` when the stamp
/// is further than `trust_ns` from both: garbage, or a clock we do not know.
pub(super) fn stamp_to_monotonic(
    stamp_us: u64,
    mono_now: u64,
    real_now: u64,
    trust_ns: u64,
) -> Option<(u64, StampClock)> {
    let stamp = stamp_us.saturating_mul(1000);
    let from_real = stamp.abs_diff(real_now);
    let from_mono = stamp.abs_diff(mono_now);
    if from_real <= from_mono && from_real < trust_ns {
        let ts = i128::from(mono_now) + i128::from(stamp) - i128::from(real_now);
        Some((u64::try_from(ts).unwrap_or(0), StampClock::Wall))
    } else if from_mono < trust_ns {
        Some((stamp, StampClock::Monotonic))
    } else {
        None
    }
}

/// Logs once which clock a kind of NVML stamp is on.
pub(super) fn log_clock(logged: &mut bool, what: &str, clock: Option<StampClock>) {
    if !*logged {
        *logged = true;
        let which = match clock {
            Some(StampClock::Wall) => "wall-clock",
            Some(StampClock::Monotonic) => "monotonic",
            None => "on neither clock (not trusted)",
        };
        tracing::info!("NVML {what} timestamps are {which}");
    }
}
