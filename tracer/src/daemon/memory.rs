//! How the daemon's heap behaves after bursts. glibc hands freed memory back to the system
//! only from the top of a heap, and keeps an arena per allocating thread: after a burst (10k
//! connections opening, service discovery reading a large `/proc/net/tcp`) freed memory stays
//! resident. So once the probes have been quiet for a moment after some work, the daemon asks
//! glibc to return what is free ([`Quiet`]): 10k connections 77 -> 59 MiB. Tried and dropped:
//! a fixed trim threshold (it switches off glibc's adaptive thresholds, and every tick then
//! gave its buffers back and faulted them in again: +50 % daemon CPU per streamed request) and
//! a single arena (dearer under streaming, within the noise of one run).

/// Ticks without probe records after which the heap is trimmed (once per burst): 2 s at the
/// default 100 ms tick.
const QUIET_TICKS: u32 = 20;

/// Watches the probes' traffic tick by tick and trims the heap once it has gone quiet after
/// some work: never while records flow (no thrash), at most once per quiet spell.
#[derive(Debug, Default)]
pub struct Quiet {
    quiet_ticks: u32,
    worked: bool,
}

impl Quiet {
    /// `records`: what the probes delivered since the last tick.
    pub fn tick(&mut self, records: usize) {
        if records > 0 {
            self.quiet_ticks = 0;
            self.worked = true;
            return;
        }
        self.quiet_ticks = self.quiet_ticks.saturating_add(1);
        if self.worked && self.quiet_ticks >= QUIET_TICKS {
            self.worked = false;
            trim();
        }
    }
}

fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_per_quiet_spell_after_work_only() {
        let mut q = Quiet::default();
        for _ in 0..100 {
            q.tick(0);
        }
        assert!(!q.worked, "nothing to give back before any work");
        q.tick(5);
        assert!(q.worked);
        for _ in 0..QUIET_TICKS - 1 {
            q.tick(0);
            assert!(q.worked, "not yet quiet long enough");
        }
        q.tick(0);
        assert!(!q.worked, "trimmed");
        // Steady traffic never trims.
        for _ in 0..100 {
            q.tick(1);
            assert!(q.worked);
        }
    }
}
