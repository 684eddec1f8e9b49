//! A CUDA-like process for the step clock's tests and benchmark: loads a `libcuda.so` (the
//! stand-in, `tests/cuda-stub`) with `dlopen` and calls its driver API like an engine does.
//!
//! Usage:
//! - `cuda-steps steps <lib> <steps> <launches-per-step> <empty-syncs-per-step>`: prints
//!   `ready <pid>` once the library is loaded, waits for a line on stdin (time to attach),
//!   then per step: `launches-per-step` × `cuLaunchKernel` and one `cuStreamSynchronize`,
//!   then `empty-syncs-per-step` synchronisations with nothing launched (cycling through
//!   `cuEventSynchronize`, `cuCtxSynchronize`, `cuStreamSynchronize`). Each step also moves
//!   16 bytes over a socketpair made before `ready` (IPC the tracer finds at attach) and 32
//!   bytes over a Unix connection made after the go (IPC the probes see being made). A thread
//!   is blocked reading a second socketpair from before `ready` (like an API process waiting
//!   for its engine's next message when the tracer attaches); after the go it gets 24 bytes.
//!   Prints `done <steps> <empty syncs> <socketpair fd out> <socketpair fd in> <client fd>
//!   <server fd> <blocked reader's fd>`, then waits for a line: `again` runs the steps once
//!   more, anything else exits.
//! - `cuda-steps bench <lib> <iterations>`: `ready <pid>`, waits for a line, then prints
//!   `launch_ns`, `sync_ns` (nothing launched before it) and `step_ns` (10 launches and a
//!   synchronisation), means per call, best of 3 rounds.

use std::{
    ffi::{CString, c_int, c_uint, c_void},
    io::{BufRead as _, Read as _, Write as _},
    os::{
        fd::AsRawFd as _,
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
    time::Instant,
};

type Launch = unsafe extern "C" fn(
    *mut c_void,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut c_void,
    *mut *mut c_void,
    *mut *mut c_void,
) -> c_int;
type Sync = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxSync = unsafe extern "C" fn() -> c_int;
type Init = unsafe extern "C" fn(c_uint) -> c_int;

/// The driver entry points used.
struct Driver {
    launch: Launch,
    stream_sync: Sync,
    event_sync: Sync,
    ctx_sync: CtxSync,
}

fn symbol(lib: *mut c_void, name: &str) -> *mut c_void {
    let c = CString::new(name).expect("symbol name");
    // SAFETY: a handle from dlopen and a NUL-terminated name.
    let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
    assert!(!p.is_null(), "{name} missing from the library");
    p
}

impl Driver {
    fn open(path: &str) -> Driver {
        let c = CString::new(path).expect("library path");
        // SAFETY: a NUL-terminated path.
        let lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
        assert!(!lib.is_null(), "dlopen {path} failed");
        // SAFETY: the symbols have these C signatures (the CUDA driver API).
        unsafe {
            let init: Init = std::mem::transmute::<*mut c_void, Init>(symbol(lib, "cuInit"));
            assert_eq!(init(0), 0, "cuInit");
            Driver {
                launch: std::mem::transmute::<*mut c_void, Launch>(symbol(lib, "cuLaunchKernel")),
                stream_sync: std::mem::transmute::<*mut c_void, Sync>(symbol(
                    lib,
                    "cuStreamSynchronize",
                )),
                event_sync: std::mem::transmute::<*mut c_void, Sync>(symbol(
                    lib,
                    "cuEventSynchronize",
                )),
                ctx_sync: std::mem::transmute::<*mut c_void, CtxSync>(symbol(
                    lib,
                    "cuCtxSynchronize",
                )),
            }
        }
    }

    fn launch(&self) {
        let null = std::ptr::null_mut();
        // SAFETY: the stand-in ignores its arguments; a real driver would need a function.
        let rc =
            unsafe { (self.launch)(null, 1, 1, 1, 32, 1, 1, 0, null, null.cast(), null.cast()) };
        debug_assert_eq!(rc, 0);
    }

    fn sync(&self, which: usize) {
        // SAFETY: null stream/event: the stand-in ignores them.
        let rc = unsafe {
            match which % 3 {
                0 => (self.stream_sync)(std::ptr::null_mut()),
                1 => (self.event_sync)(std::ptr::null_mut()),
                _ => (self.ctx_sync)(),
            }
        };
        debug_assert_eq!(rc, 0);
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Mean ns per call of `f` over `n` calls, best of 3 rounds.
fn best_of_3(n: u32, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(n.max(1)));
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let lib = args
        .get(2)
        .cloned()
        .expect("usage: cuda-steps steps|bench <lib> ...");
    let driver = Driver::open(&lib);
    // Before `ready`: a link the tracer can only find in /proc (service discovery).
    let (mut pair_out, mut pair_in) = UnixStream::pair().expect("socketpair");
    // A read already waiting when the tracer attaches.
    let (mut waited_out, mut waited_in) = UnixStream::pair().expect("socketpair");
    let waited_fd = waited_in.as_raw_fd();
    let waiting = std::thread::spawn(move || {
        let mut buf = [0u8; 24];
        waited_in.read_exact(&mut buf).expect("blocked read");
    });
    let mut out = std::io::stdout().lock();
    let stdin = std::io::stdin();
    let mut line = String::new();
    writeln!(out, "ready {}", std::process::id()).expect("stdout");
    out.flush().expect("flush");
    stdin.lock().read_line(&mut line).expect("stdin");
    if mode == "bench" {
        let n: u32 = arg(&args, 3, 200_000);
        let launch = best_of_3(n, || driver.launch());
        // Emit what the launches left, so the empty round starts empty.
        driver.sync(0);
        let sync = best_of_3(n, || driver.sync(0));
        let step = best_of_3(n / 10, || {
            for _ in 0..10 {
                driver.launch();
            }
            driver.sync(0);
        });
        writeln!(out, "launch_ns {launch:.0}").expect("stdout");
        writeln!(out, "sync_ns {sync:.0}").expect("stdout");
        writeln!(out, "step_ns {step:.0}").expect("stdout");
        // The waiting read ends with its bytes, not with a closed socket (a panic at exit).
        waited_out
            .write_all(&[0u8; 24])
            .expect("write to the waiting reader");
        waiting.join().expect("waiting reader");
        return;
    }
    let steps: u32 = arg(&args, 3, 5);
    let launches: u32 = arg(&args, 4, 7);
    let empty: usize = arg(&args, 5, 2);
    let name = SocketAddr::from_abstract_name(format!("tracer-cuda-steps-{}", std::process::id()))
        .expect("abstract name");
    let listener = UnixListener::bind_addr(&name).expect("bind");
    let mut client = UnixStream::connect_addr(&name).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    waited_out
        .write_all(&[b'w'; 24])
        .expect("write to the waiting reader");
    waiting.join().expect("waiting reader");
    loop {
        let mut empties = 0usize;
        let mut buf = [0u8; 32];
        for _ in 0..steps {
            for _ in 0..launches {
                driver.launch();
            }
            driver.sync(0);
            for i in 0..empty {
                driver.sync(i + 1);
                empties += 1;
            }
            pair_out.write_all(&[b'p'; 16]).expect("socketpair write");
            pair_in.read_exact(&mut buf[..16]).expect("socketpair read");
            client.write_all(&[b'c'; 32]).expect("unix write");
            server.read_exact(&mut buf).expect("unix read");
        }
        writeln!(
            out,
            "done {steps} {empties} {} {} {} {} {waited_fd}",
            pair_out.as_raw_fd(),
            pair_in.as_raw_fd(),
            client.as_raw_fd(),
            server.as_raw_fd()
        )
        .expect("stdout");
        out.flush().expect("flush");
        line.clear();
        let _ = stdin.lock().read_line(&mut line);
        if line.trim() != "again" {
            break;
        }
    }
}
