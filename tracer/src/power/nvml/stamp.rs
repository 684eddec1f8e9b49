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

/// A later read that still carries the previous read's stamp, this much later or more, shows
/// that the driver stamps the energy field with the counter's last update.
const STAMP_HOLD_NS: u64 = 1_000_000;

/// What the energy field's stamps mean. Drivers seen so far (H200, 580.x) stamp it at the
/// query, like every other field; one that stamped it with the counter's last update would
/// make the ledger read each update as seen only then, placing every counter interval up to
/// a period early (half a period on average: 50 ms on A100/H100). Such stamps hold across the
/// reads between two updates; once seen to, the read time is used instead.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct EnergyStamps {
    last: Option<(i64, u64)>,
    held: bool,
}

impl EnergyStamps {
    /// The time to give a counter read that carried `stamp` (converted: `stamped_ns`) and was
    /// made at `read_ns`; `true` the first time the stamps are seen to hold.
    pub(super) fn read_time(
        &mut self,
        stamp: i64,
        stamped_ns: Option<u64>,
        read_ns: u64,
    ) -> (u64, bool) {
        let newly = !self.held
            && self
                .last
                .is_some_and(|(s, at)| s == stamp && read_ns >= at.saturating_add(STAMP_HOLD_NS));
        self.held |= newly;
        self.last = Some((stamp, read_ns));
        let ts = if self.held {
            read_ns
        } else {
            stamped_ns.unwrap_or(read_ns)
        };
        (ts, newly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_stamps_that_hold_across_reads_give_way_to_read_times() {
        let mut s = EnergyStamps::default();
        // Stamped at the query: the stamp is the read time.
        assert_eq!(
            s.read_time(1_000, Some(1_000_000), 1_000_100),
            (1_000_000, false)
        );
        assert_eq!(
            s.read_time(21_000, Some(21_000_000), 21_000_100),
            (21_000_000, false)
        );
        // Stamped at the update: the same stamp 20 ms later.
        let mut s = EnergyStamps::default();
        assert_eq!(
            s.read_time(5_000, Some(5_000_000), 30_000_000),
            (5_000_000, false)
        );
        assert_eq!(
            s.read_time(5_000, Some(5_000_000), 50_000_000),
            (50_000_000, true)
        );
        assert_eq!(
            s.read_time(105_000, Some(105_000_000), 110_000_000),
            (110_000_000, false)
        );
    }
}
