//! Attaches the empty-program floor (`tracer::probe::Floor`) to every tracepoint the daemon
//! uses and holds it until SIGINT or SIGTERM: what `cargo xtask bench-probes` holds the probes'
//! tax to. Prints `attached` to stderr once every program is attached.

fn main() -> anyhow::Result<()> {
    // Blocked before attaching, so a signal sent as soon as `attached` is read is not lost.
    // SAFETY: plain libc signal-set calls on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        set
    };
    let _floor = tracer::probe::Floor::attach()?;
    eprintln!("attached");
    let mut signal = 0;
    // SAFETY: the set was initialised above.
    unsafe { libc::sigwait(&raw const set, &raw mut signal) };
    Ok(())
}
