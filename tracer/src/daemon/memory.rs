//! How the daemon's heap behaves under bursts. glibc gives each thread that allocates its own
//! arena (up to 8 per core) and returns freed memory to the system only from the top of a
//! heap past a 128 KiB threshold that grows with every large free: after a burst (10k
//! connections opening, a ring drained in big batches) the freed memory stays resident in
//! whichever arena took it. Measured (`cargo xtask bench-rss`): 75 MiB at 10k connections with
//! glibc's defaults, 66.8 MiB with two arenas, 63.6 MiB with one, each with a fixed trim
//! threshold.

/// One arena (the pipeline's thread does nearly all the allocating; small blocks come from
/// each thread's cache without the arena's lock) and a fixed 128 KiB trim threshold. Called
/// before any thread starts; a no-op off glibc.
pub fn settle_allocator() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only tunes the allocator; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        }
    }
}
