//! Measures what the probes cost a process: ns per syscall for a loop of socket writes+reads on
//! an accepted loopback TCP connection, and of ioctls on a stand-in device node.
//!
//! Usage: `syscall-bench <device-root> <iterations>`. Prints `ready <pid>` once its connection
//! is open and the device is open, waits for a line on stdin (time for a tracer to attach by pid
//! or not), then prints `write_read_ns <x>`, `ioctl_ns <y>` and `getppid_ns <z>` (mean per
//! operation, best of 3). `getppid` is a syscall no probe hooks: what it pays is what enabling
//! syscall tracepoints at all costs every syscall on the host.

use std::{
    ffi::CString,
    io::{BufRead as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Instant,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = args.get(1).cloned().unwrap_or_else(|| "/dev".into());
    let iterations: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", std::process::id()).expect("stdout");
    out.flush().expect("flush");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");
    // Accept after the go, so a tracer attached by pid sees the connection being made.
    let (server, _) = listener.accept().expect("accept");
    let path = CString::new(format!("{root}/nvidia0")).expect("path");
    // SAFETY: valid C string.
    let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
    assert!(dev >= 0, "open device stand-in");

    let (s, c) = (server.as_raw_fd(), client.as_raw_fd());
    let msg = [b'x'; 64];
    let mut buf = [0u8; 64];
    let mut best_rw = f64::MAX;
    let mut best_ioctl = f64::MAX;
    let mut best_other = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..iterations {
            // SAFETY: valid fds and buffers.
            unsafe {
                libc::write(s, msg.as_ptr().cast(), msg.len());
                libc::read(c, buf.as_mut_ptr().cast(), buf.len());
            }
        }
        best_rw = best_rw.min(t.elapsed().as_nanos() as f64 / f64::from(iterations));
        let t = Instant::now();
        for _ in 0..iterations {
            // SAFETY: regular file: ENOTTY, params untouched.
            unsafe { libc::ioctl(dev, 0xC030_462B_u64 as libc::c_ulong, buf.as_mut_ptr()) };
        }
        best_ioctl = best_ioctl.min(t.elapsed().as_nanos() as f64 / f64::from(iterations));
        let t = Instant::now();
        for _ in 0..iterations {
            // SAFETY: no arguments; glibc does not cache it.
            unsafe { libc::getppid() };
        }
        best_other = best_other.min(t.elapsed().as_nanos() as f64 / f64::from(iterations));
    }
    writeln!(out, "write_read_ns {best_rw:.0}").expect("stdout");
    writeln!(out, "ioctl_ns {best_ioctl:.0}").expect("stdout");
    writeln!(out, "getppid_ns {best_other:.1}").expect("stdout");
}
