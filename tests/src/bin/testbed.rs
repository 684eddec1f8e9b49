//! A traced process with a known script of syscalls, driven over stdin/stdout by the tests.
//!
//! Protocol: prints `listening <port>`, waits for `go` on stdin, then accepts one TCP
//! connection, `read`s the request (until a blank line), answers with one `write` (head) and one
//! three-segment `writev` (body), closes; opens `<device-root>/nvidia0` and issues the ioctls
//! given with `--ioctl` (hex), closes; forks a child that opens `<device-root>/nvidiactl`, issues
//! `--child-ioctl` once and exits; starts a thread that ends at once. Each step prints what it
//! did (fds, pids, thread id) for the test to check.

use std::{
    ffi::CString,
    io::{BufRead as _, Write as _},
    net::TcpListener,
    os::fd::AsRawFd as _,
};

fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex ioctl number")
}

fn open_dev(path: &str) -> i32 {
    let c = CString::new(path).expect("path");
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "open {path}: {}", std::io::Error::last_os_error());
    fd
}

fn ioctl(fd: i32, cmd: u64) {
    let mut params = [0u8; 64];
    // SAFETY: a stand-in device (regular file): the kernel answers ENOTTY without touching params.
    unsafe { libc::ioctl(fd, cmd as libc::c_ulong, params.as_mut_ptr()) };
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut device_root = String::from("/dev");
    let mut ioctls = Vec::new();
    let mut child_ioctl = None;
    let mut body_parts = vec![
        "0123456789".to_string(),
        "abcdefghij".into(),
        "KLMNOPQRST".into(),
    ];
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--device-root" => device_root.clone_from(it.next().expect("value")),
            "--ioctl" => ioctls.push(parse_hex(it.next().expect("value"))),
            "--child-ioctl" => child_ioctl = Some(parse_hex(it.next().expect("value"))),
            "--body" => {
                body_parts = it
                    .next()
                    .expect("value")
                    .split(',')
                    .map(String::from)
                    .collect();
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {port}").expect("stdout");
    out.flush().expect("flush");

    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");
    assert_eq!(line.trim(), "go", "expected go");

    let (stream, _) = listener.accept().expect("accept");
    let fd = stream.as_raw_fd();
    writeln!(out, "accepted {fd}").expect("stdout");
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.ends_with(b"\r\n\r\n") {
        // SAFETY: valid buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n > 0, "read: {n}");
        request.extend_from_slice(&buf[..n as usize]);
    }
    writeln!(out, "request {}", request.len()).expect("stdout");
    let body_len: usize = body_parts.iter().map(String::len).sum();
    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\n\r\n");
    // SAFETY: valid buffer.
    let n = unsafe { libc::write(fd, head.as_ptr().cast(), head.len()) };
    assert_eq!(n as usize, head.len());
    let iov: Vec<libc::iovec> = body_parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: iovecs point into live strings.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) };
    assert_eq!(n as usize, body_len);
    writeln!(out, "response {} {}", head.len(), body_len).expect("stdout");
    drop(stream);

    let dev = open_dev(&format!("{device_root}/nvidia0"));
    writeln!(out, "dev {dev}").expect("stdout");
    for &cmd in &ioctls {
        ioctl(dev, cmd);
    }
    // SAFETY: our fd.
    unsafe { libc::close(dev) };

    if let Some(cmd) = child_ioctl {
        out.flush().expect("flush");
        // SAFETY: the child only makes syscalls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let fd = open_dev(&format!("{device_root}/nvidiactl"));
            ioctl(fd, cmd);
            // SAFETY: leave without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        writeln!(out, "forked {pid}").expect("stdout");
    }
    // A thread that starts and ends: followed at creation, forgotten at its end.
    let tid = std::thread::spawn(|| {
        // SAFETY: gettid has no arguments and cannot fail.
        unsafe { libc::gettid() }
    })
    .join()
    .expect("thread");
    writeln!(out, "thread {tid}").expect("stdout");
    writeln!(out, "done").expect("stdout");
    out.flush().expect("flush");
    // Stay alive until the test closes stdin, so the daemon sees us as a live target throughout.
    let _ = std::io::stdin().lock().read_line(&mut line);
}
