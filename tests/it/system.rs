//! tracer as a system service (issue 19): after giving up its capabilities the daemon still
//! drains the ring, samples power, re-discovers services, attaches to a target started later
//! and serves its socket, and can no longer write where only the dropped capability would let
//! it; systemd's readiness and reload protocol over a fake notify socket; a configuration that
//! does not parse changes nothing; it stops well within the unit's `TimeoutStopSec`.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram, net::UnixStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tracer_tests::{EmuEnv, Tracer, emuload, free_port, jsonl, privileged_or_skip, wait_until};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
/// What the daemon keeps with its uprobe step clocks on (the default): `CAP_DAC_READ_SEARCH`
/// (2), `CAP_SYS_PTRACE` (19), `CAP_SYS_ADMIN` (21), `CAP_PERFMON` (38), `CAP_BPF` (39).
const KEPT: u64 = (1 << 2) | (1 << 19) | (1 << 21) | (1 << 38) | (1 << 39);
/// The unit's `TimeoutStopSec`.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const NOBODY: u32 = 65534;

/// A hexadecimal capability mask (or a number) from a `/proc/<pid>/task/<tid>/status` line.
fn status_field(status: &str, key: &str) -> u64 {
    let v = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} missing"))
        .trim();
    u64::from_str_radix(v, 16).unwrap_or_else(|_| panic!("{key} {v:?}"))
}

fn wait_for(what: &str, tracer: &Tracer, done: impl FnMut() -> bool) {
    wait_until(what, Duration::from_secs(30), done, || tracer.log_text());
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

fn get(port: u16) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    assert!(reply.starts_with("HTTP/1.0 200"), "{reply:.80}");
}

/// Python's stdlib HTTP server on a free port, listening.
fn http_server(dir: &Path) -> (Child, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the test server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

fn next_notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification within 60 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// SIGHUP, and the service manager told of the reload and of readiness after it.
fn hangup(tracer: &Tracer, notify: &UnixDatagram) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGHUP) };
    let reloading = next_notification(notify);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let ready = next_notification(notify);
    assert!(ready.starts_with("READY=1\nSTATUS=tracing "), "{ready:?}");
}

#[test]
fn after_dropping_privileges_the_daemon_still_does_its_work() {
    if !privileged_or_skip("after_dropping_privileges_the_daemon_still_does_its_work") {
        return;
    }
    let env = EmuEnv::new("privdrop");
    let dir = env.dir.path();
    let (mut host, port_a) = env.start_host(1);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).expect("out");
    let records = out.join("records.jsonl");
    let config = dir.join("tracer.toml");
    // Records final within two seconds (the cost model's warm-up would otherwise hold the first
    // requests of a quiet service for up to a minute).
    let ledger = "[ledger]\nmax_defer_ns = 2000000000\n";
    std::fs::write(&config, format!("{ledger}[targets]\nports = [{port_a}]\n")).expect("config");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let tracer = env.start_tracer(
        TRACER,
        &[
            "--config",
            config.to_str().expect("utf8"),
            "--records-out",
            records.to_str().expect("utf8"),
            "--summary-interval-ms",
            "500",
        ],
        &[("NOTIFY_SOCKET", &notify_path)],
    );
    let ready = next_notification(&notify);
    assert!(ready.starts_with("READY=1\nSTATUS=tracing "), "{ready:?}");

    // Every thread holds the kept set and nothing else, in every set; no-new-privs.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", tracer.pid())).expect("tasks");
    let mut threads = 0;
    for task in tasks {
        let status =
            std::fs::read_to_string(task.expect("task").path().join("status")).expect("status");
        for key in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(status_field(&status, key), KEPT, "{key}\n{status}");
        }
        assert_eq!(status_field(&status, "CapInh:"), 0);
        assert_eq!(status_field(&status, "CapAmb:"), 0);
        assert_eq!(status_field(&status, "NoNewPrivs:"), 1);
        threads += 1;
    }
    assert!(threads > 1, "the sampler and store threads are checked too");

    // The ring drained and the GPU sampled: every request of a load gets a record with GPU
    // energy from the NVML emulation.
    let load_out = dir.join("load.jsonl");
    let sent = emuload(
        port_a,
        &[
            "--seconds",
            "2",
            "--concurrency",
            "4",
            "--max-tokens-max",
            "64",
        ],
        &load_out,
    );
    assert!(sent > 0);
    wait_for("a record per request", &tracer, || lines(&records) >= sent);
    let gpu_j: f64 = jsonl(&records)
        .iter()
        .flat_map(|r| r["devices"].as_array().cloned().unwrap_or_default())
        .filter(|d| d["kind"] == "gpu")
        .filter_map(|d| d["dynamic_j"].as_f64())
        .sum();
    assert!(gpu_j > 0.0, "no GPU energy in the records");

    // The API socket serves.
    let mut api = UnixStream::connect(dir.join("tracer.sock")).expect("API socket");
    api.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("ask");
    let mut health = String::new();
    api.read_to_string(&mut health).expect("answer");
    assert!(health.starts_with("HTTP/1.1 200"), "{health:.200}");

    // A configuration that does not parse changes nothing.
    std::fs::write(&config, "[targets\nports = ").expect("garbage");
    hangup(&tracer, &notify);
    wait_for("the refused configuration logged", &tracer, || {
        tracer
            .log_text()
            .contains("the configuration was not read, nothing changed")
    });
    // Nor does one that names no target (the daemon would have nothing left to trace).
    std::fs::write(&config, ledger).expect("no targets");
    hangup(&tracer, &notify);
    wait_for("the empty target list refused", &tracer, || {
        tracer
            .log_text()
            .contains("the configuration names no target, nothing changed")
    });

    // A target started later: named in the file, re-resolved on SIGHUP, its service discovered
    // and its requests recorded.
    let (mut server_b, port_b) = http_server(dir);
    std::fs::write(
        &config,
        format!("{ledger}[targets]\nports = [{port_a}, {port_b}]\n"),
    )
    .expect("config");
    hangup(&tracer, &notify);
    wait_for("the new target resolved", &tracer, || {
        tracer
            .log_text()
            .contains("targets re-resolved: 1 new processes")
    });
    let service_b = format!("port {port_b}");
    let of_b = |path: &Path| {
        jsonl(path)
            .iter()
            .filter(|r| r["service_name"] == service_b.as_str())
            .count()
    };
    for _ in 0..3 {
        get(port_b);
    }
    wait_for("records of the new target's service", &tracer, || {
        of_b(&records) == 3
    });

    // logrotate moved the records file, and the directory now belongs to another user: root
    // without CAP_DAC_OVERRIDE cannot create the new file, so it keeps writing the old one.
    let rotated = out.join("records.jsonl.1");
    std::fs::rename(&records, &rotated).expect("rotate");
    std::os::unix::fs::chown(&out, Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let probe = out.join("probe");
    std::fs::write(&probe, "").expect("this test, with every capability, can write there");
    std::fs::remove_file(&probe).expect("remove");
    hangup(&tracer, &notify);
    wait_for("the refused reopen logged", &tracer, || {
        let log = tracer.log_text();
        log.contains("reopening output records failed") && log.contains("Permission denied")
    });
    assert!(
        !records.exists(),
        "the daemon created a file it had no business creating"
    );
    for _ in 0..2 {
        get(port_b);
    }
    wait_for("records kept in the old file", &tracer, || {
        of_b(&rotated) == 5
    });
    // Given the directory back, the next SIGHUP reopens the file at its path.
    std::os::unix::fs::chown(&out, Some(0), Some(0)).expect("chown back");
    hangup(&tracer, &notify);
    wait_for("the file reopened", &tracer, || records.exists());
    get(port_b);
    wait_for("records in the new file", &tracer, || of_b(&records) == 1);

    // Stops within the unit's timeout, saying so first.
    let asked = Instant::now();
    tracer.stop();
    assert!(asked.elapsed() < STOP_TIMEOUT, "{:?}", asked.elapsed());
    assert_eq!(next_notification(&notify), "STOPPING=1");
    assert_eq!(
        lines(&rotated) + lines(&records),
        sent + 6,
        "every request has exactly one record across the rotated and the new file"
    );
    let _ = server_b.kill();
    let _ = server_b.wait();
    host.stop();
}
