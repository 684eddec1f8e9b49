//! SIGTERM/SIGINT as a flag.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Make SIGTERM and SIGINT set the flag read by [`stop_requested`] instead of killing the
/// process.
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// For the engine child: SIGTERM sets the flag, SIGINT is ignored. A Ctrl-C reaches the
/// whole process group; the API process then stops the engine itself (and the engine stops on
/// its own when the API process's socket closes), so the engine does not race it.
pub fn install_engine() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: as in `install`; SIG_IGN is always a valid disposition.
    unsafe {
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

/// Whether SIGTERM or SIGINT arrived since [`install`].
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
