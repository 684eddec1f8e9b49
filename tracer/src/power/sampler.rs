//! The sampler thread: polls one source every period and sends its readings to the event
//! loop, accounting what that costs ([`SamplerStats`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use super::{PowerSource, Reading, clock::thread_cpu_ns};

/// What a sampler thread has cost so far. The thread updates it after every poll (atomics: no
/// lock on the sampling path) and anyone holding the `Arc` reads it, so the daemon can report
/// its own overhead and benchmarks can measure it without instrumenting the source.
#[derive(Debug, Default)]
pub struct SamplerStats {
    polls: AtomicU64,
    cpu_ns: AtomicU64,
    poll_wall_ns: AtomicU64,
    max_poll_wall_ns: AtomicU64,
    late: AtomicU64,
}

impl SamplerStats {
    /// Polls completed.
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    /// CPU time the thread has used since it started (`CLOCK_THREAD_CPUTIME_ID`, read by the
    /// thread after each poll): polling, building and sending batches, and the sleep calls.
    pub fn cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Ordering::Relaxed)
    }

    /// Wall time spent inside [`PowerSource::poll`], summed: CPU plus time blocked in the
    /// driver.
    pub fn poll_wall_ns(&self) -> u64 {
        self.poll_wall_ns.load(Ordering::Relaxed)
    }

    /// The longest single poll, wall time.
    pub fn max_poll_wall_ns(&self) -> u64 {
        self.max_poll_wall_ns.load(Ordering::Relaxed)
    }

    /// Polls that ended after the next one was due: the source is too slow for the period.
    pub fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }
}

/// Runs `source` on its own thread every `period`, sending batches of readings until the
/// receiver is dropped. Returns the thread handle and the thread's running cost.
pub fn spawn_sampler(
    mut source: Box<dyn PowerSource>,
    period: Duration,
    tx: mpsc::Sender<Vec<Reading>>,
) -> std::io::Result<(std::thread::JoinHandle<()>, Arc<SamplerStats>)> {
    let stats = Arc::new(SamplerStats::default());
    let shared = Arc::clone(&stats);
    let handle = std::thread::Builder::new()
        .name("power-sampler".into())
        .spawn(move || {
            let mut next = Instant::now();
            let mut capacity = 0;
            loop {
                let started = Instant::now();
                let mut batch = Vec::with_capacity(capacity);
                source.poll(&mut batch);
                let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                capacity = batch.len();
                let sent = tx.send(batch).is_ok();
                shared.polls.fetch_add(1, Ordering::Relaxed);
                shared.poll_wall_ns.fetch_add(took, Ordering::Relaxed);
                shared.max_poll_wall_ns.fetch_max(took, Ordering::Relaxed);
                shared.cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
                if !sent {
                    return;
                }
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    // Fell behind (slow driver): do not try to catch up in a burst.
                    shared.late.fetch_add(1, Ordering::Relaxed);
                    next = now;
                }
            }
        })?;
    Ok((handle, stats))
}
