//! When services are looked for again. A pass reads the socket tables and every process's
//! fds from /proc: on a host with a large TCP hash that is milliseconds of kernel time whatever
//! the load (a sixth of the daemon's CPU on a streaming server at one pass per 5 s). New IPC
//! peers come with new processes, so passes that find nothing new space out (doubling up to
//! `probe.rediscover_max_ms`) and an exec or exit among the traced processes, or a pass that
//! found something, brings them back to `probe.rediscover_ms`.

use std::time::Duration;

/// The next pass's delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    now: Duration,
}

impl Backoff {
    pub fn new(base_ms: u64, max_ms: u64) -> Self {
        let base = Duration::from_millis(base_ms.max(100));
        Backoff {
            base,
            max: Duration::from_millis(max_ms).max(base),
            now: base,
        }
    }

    /// A pass ended: `changed` when it found a new member or IPC link or attached a clock.
    /// Returns the delay before the next pass.
    pub fn passed(&mut self, changed: bool) -> Duration {
        self.now = if changed {
            self.base
        } else {
            (self.now * 2).min(self.max)
        };
        self.now
    }

    /// Processes started or ended among the targets: back to the base delay, which is
    /// returned when it is sooner than the one in use.
    pub fn processes_changed(&mut self) -> Option<Duration> {
        let sooner = self.now > self.base;
        self.now = self.base;
        sooner.then_some(self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_passes_space_out_and_changes_bring_them_back() {
        let mut b = Backoff::new(5_000, 60_000);
        let secs: Vec<u64> = (0..6).map(|_| b.passed(false).as_secs()).collect();
        assert_eq!(secs, [10, 20, 40, 60, 60, 60]);
        assert_eq!(b.passed(true).as_secs(), 5);
        assert_eq!(b.processes_changed(), None, "already at the base delay");
        b.passed(false);
        assert_eq!(b.processes_changed(), Some(Duration::from_secs(5)));
        assert_eq!(b.passed(false).as_secs(), 10);
        // A maximum below the base is the base: no backoff.
        let mut flat = Backoff::new(5_000, 1_000);
        assert_eq!(flat.passed(false).as_secs(), 5);
    }
}
