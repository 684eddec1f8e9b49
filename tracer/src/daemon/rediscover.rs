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
    /// Processes started or ended while a pass ran: it may have read /proc before them.
    changed_in_pass: bool,
}

impl Backoff {
    pub fn new(base_ms: u64, max_ms: u64) -> Self {
        let base = Duration::from_millis(base_ms.max(100));
        Backoff {
            base,
            max: Duration::from_millis(max_ms).max(base),
            now: base,
            changed_in_pass: false,
        }
    }

    /// The delay in use (the first pass's: the base one).
    pub fn delay(&self) -> Duration {
        self.now
    }

    /// A pass starts.
    pub fn started(&mut self) {
        self.changed_in_pass = false;
    }

    /// A pass ended: `changed` when it found a new member or IPC link or attached a clock.
    /// Returns the delay before the next pass (the base one too when processes changed while
    /// it ran: what it read may predate them).
    pub fn passed(&mut self, changed: bool) -> Duration {
        let changed = changed || std::mem::take(&mut self.changed_in_pass);
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
        self.changed_in_pass = true;
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
        b.started();
        assert_eq!(b.passed(false).as_secs(), 10);
        // During a pass: remembered for its end (the daemon leaves the timer alone).
        b.started();
        assert_eq!(b.processes_changed(), Some(Duration::from_secs(5)));
        assert_eq!(b.passed(false).as_secs(), 5, "changed while that pass ran");
        b.started();
        assert_eq!(b.passed(false).as_secs(), 10);
        // Before a pass: it comes sooner, and the change is not counted again after it.
        assert_eq!(b.processes_changed(), Some(Duration::from_secs(5)));
        b.started();
        assert_eq!(b.passed(false).as_secs(), 10);
        // A maximum below the base is the base: no backoff.
        let mut flat = Backoff::new(5_000, 1_000);
        assert_eq!(flat.passed(false).as_secs(), 5);
    }
}
