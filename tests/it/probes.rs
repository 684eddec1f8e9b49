//! The real probes, attached to a real process: does the daemon see exactly the syscalls the
//! process made, with the right fds, byte counts and ioctl numbers, and nothing of its own?

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
};

use serde_json::Value;
use tracer_tests::{TempDir, Tracer, events_of, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
const TESTBED: &str = env!("CARGO_BIN_EXE_testbed");

/// NVIDIA ioctl numbers the testbed issues (`RM_ALLOC`, `RM_CONTROL`, `RM_FREE`) and its child issues
/// (`UVM_INITIALIZE`); see ../shared/notes/nvidia-driver.md.
const IOCTLS: [u64; 3] = [0xC030_462B, 0xC020_462A, 0xC010_4629];
const CHILD_IOCTL: u64 = 0x3000_0001;
const REQUEST: &[u8] = b"GET /probe HTTP/1.1\r\nHost: testbed\r\nX-Marker: 42\r\n\r\n";

fn expect_line(lines: &mut impl Iterator<Item = String>, word: &str) -> Vec<u64> {
    let line = lines
        .next()
        .unwrap_or_else(|| panic!("testbed ended before `{word}`"));
    let mut parts = line.split_whitespace();
    assert_eq!(parts.next(), Some(word), "unexpected testbed line {line:?}");
    parts.map(|p| p.parse().expect("number")).collect()
}

/// Stand-in device nodes under `dir`/dev (regular files, so ioctls reach the tracepoints and
/// fail with ENOTTY); the device root's path.
fn standin_devices(dir: &TempDir) -> String {
    let dev = dir.path().join("dev");
    std::fs::create_dir_all(&dev).expect("dev dir");
    std::fs::write(dev.join("nvidia0"), b"").expect("nvidia0");
    std::fs::write(dev.join("nvidiactl"), b"").expect("nvidiactl");
    dev.to_str().expect("utf8").to_string()
}

/// Starts the testbed (`cmd`) with piped stdio: the child, its output lines, and the port it
/// listens on.
fn spawn_testbed(cmd: &mut Command) -> (Child, impl Iterator<Item = String> + use<>, u64) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn testbed");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .map(|l| l.expect("testbed stdout"));
    let port = expect_line(&mut lines, "listening")[0];
    (child, lines, port)
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing or not a number in {v}"))
}

#[test]
fn daemon_sees_exactly_the_targets_syscalls() {
    if !privileged_or_skip("daemon_sees_exactly_the_targets_syscalls") {
        return;
    }
    let dir = TempDir::new("probes");
    let dev_root = standin_devices(&dir);
    let dev_root = dev_root.as_str();

    let mut args = vec!["--device-root".to_string(), dev_root.to_string()];
    for cmd in IOCTLS {
        args.extend(["--ioctl".into(), format!("{cmd:x}")]);
    }
    args.extend(["--child-ioctl".into(), format!("{CHILD_IOCTL:x}")]);
    let (mut testbed, mut lines, port) = spawn_testbed(Command::new(TESTBED).args(&args));
    let pid = testbed.id();

    let pid_s = pid.to_string();
    let tracer = Tracer::start(
        TRACER,
        dir.path(),
        &[
            "--pid",
            &pid_s,
            "--device-root",
            dev_root,
            "--poll-interval-ms",
            "5",
            "--summary-interval-ms",
            "200",
            // The payloads too: this test reads them.
            "--events-payload",
            // Per-call ioctl events as well as the aggregated GPU state changes.
            "--ioctl-events",
        ],
    );

    let mut stdin = testbed.stdin.take().expect("stdin");
    writeln!(stdin, "go").expect("go");
    let mut client = TcpStream::connect(("127.0.0.1", port as u16)).expect("connect");
    client.write_all(REQUEST).expect("send request");
    let mut response = Vec::new();
    client.read_to_end(&mut response).expect("read response");
    let fd = expect_line(&mut lines, "accepted")[0];
    assert_eq!(expect_line(&mut lines, "request")[0], REQUEST.len() as u64);
    let sizes = expect_line(&mut lines, "response");
    let (head_len, body_len) = (sizes[0], sizes[1]);
    assert_eq!(response.len() as u64, head_len + body_len);
    let dev_fd = expect_line(&mut lines, "dev")[0];
    let child = expect_line(&mut lines, "forked")[0] as u32;
    let thread = expect_line(&mut lines, "thread")[0];
    expect_line(&mut lines, "done");

    // Let the poll timer drain, then stop; the daemon drains once more on the way out.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let events = tracer.stop();
    drop(stdin);
    let _ = testbed.wait();

    // Only the target and its child: not the test process (the client), not the daemon.
    for e in &events {
        let tgid = num(e, "tgid") as u32;
        assert!(
            tgid == pid || tgid == child,
            "event from untraced process: {e}"
        );
    }

    let conns = events_of(&events, "conn", pid);
    assert_eq!(conns.len(), 1, "one accepted connection: {conns:?}");
    let conn = conns[0];
    assert_eq!(num(conn, "fd"), fd);
    assert_eq!(conn["syscall"], "accept4");
    assert_eq!(conn["family"], 2);
    let local_port = client.local_addr().expect("addr").port();
    assert_eq!(conn["peer"], format!("127.0.0.1:{local_port}"));
    let conn_id = num(conn, "conn_id");

    let data = events_of(&events, "data", pid);
    let inbound: Vec<_> = data.iter().filter(|d| d["inbound"] == true).collect();
    let outbound: Vec<_> = data.iter().filter(|d| d["inbound"] == false).collect();
    assert_eq!(inbound.len(), 1, "one read: {inbound:?}");
    assert_eq!(inbound[0]["syscall"], "read");
    assert_eq!(num(inbound[0], "total_len"), REQUEST.len() as u64);
    assert_eq!(
        inbound[0]["payload"],
        std::str::from_utf8(REQUEST).expect("utf8")
    );
    assert_eq!(outbound.len(), 2, "write + writev: {outbound:?}");
    assert_eq!(outbound[0]["syscall"], "write");
    assert_eq!(num(outbound[0], "total_len"), head_len);
    assert_eq!(outbound[1]["syscall"], "writev");
    assert_eq!(num(outbound[1], "total_len"), body_len);
    assert_eq!(num(outbound[1], "iov_segs"), 3);
    assert_eq!(outbound[1]["payload"], "0123456789abcdefghijKLMNOPQRST");
    for d in &data {
        assert_eq!(num(d, "fd"), fd);
        assert_eq!(num(d, "conn_id"), conn_id);
    }
    let closes = events_of(&events, "close", pid);
    assert_eq!(closes.len(), 1, "one close: {closes:?}");
    assert_eq!(
        (num(closes[0], "fd"), num(closes[0], "conn_id")),
        (fd, conn_id)
    );

    let opens = events_of(&events, "dev_open", pid);
    assert_eq!(opens.len(), 1, "{opens:?}");
    assert_eq!(num(opens[0], "fd"), dev_fd);
    assert_eq!(opens[0]["path"], format!("{dev_root}/nvidia0"));
    let ioctls = events_of(&events, "ioctl", pid);
    let cmds: Vec<u64> = ioctls.iter().map(|e| num(e, "cmd")).collect();
    assert_eq!(cmds, IOCTLS.to_vec());
    for e in &ioctls {
        assert_eq!(num(e, "fd"), dev_fd);
        assert_eq!(e["ret"], -i64::from(libc::ENOTTY));
    }
    assert_eq!(events_of(&events, "dev_close", pid).len(), 1);
    // Aggregated in the kernel: one state change (first use of GPU minor 0) for three ioctls.
    let gpu = events_of(&events, "gpu", pid);
    assert_eq!(gpu.len(), 1, "{gpu:?}");
    assert_eq!(gpu[0]["change"], "first_use");
    assert_eq!(gpu[0]["node"]["gpu"], 0);
    assert_eq!(num(gpu[0], "ioctls"), 1);

    // The forked child was followed in the kernel: its device open and ioctl were seen.
    let forks: Vec<_> = events_of(&events, "fork", pid)
        .into_iter()
        .filter(|e| num(e, "child") == u64::from(child))
        .collect();
    assert_eq!(forks.len(), 1, "fork of {child} seen");
    let child_opens = events_of(&events, "dev_open", child);
    assert_eq!(child_opens.len(), 1);
    assert_eq!(child_opens[0]["path"], format!("{dev_root}/nvidiactl"));
    let child_ioctls = events_of(&events, "ioctl", child);
    assert_eq!(child_ioctls.len(), 1);
    assert_eq!(num(child_ioctls[0], "cmd"), CHILD_IOCTL);
    let child_gpu = events_of(&events, "gpu", child);
    assert_eq!(child_gpu.len(), 1, "{child_gpu:?}");
    assert_eq!(child_gpu[0]["node"], "ctl");
    assert_eq!(
        events_of(&events, "exit", child).len(),
        1,
        "child exit seen"
    );

    // The thread: its creation (a fork record from the target) and its end, flagged a thread.
    let thread_forks: Vec<_> = events_of(&events, "fork", pid)
        .into_iter()
        .filter(|e| num(e, "child") == thread)
        .collect();
    assert_eq!(thread_forks.len(), 1, "thread creation seen");
    let ends: Vec<_> = events_of(&events, "exit", pid);
    assert_eq!(
        ends.len(),
        1,
        "only the thread ended, not the process: {ends:?}"
    );
    assert_eq!(num(ends[0], "pid"), thread);
    assert_eq!(ends[0]["thread"], true);
}

/// The benchmark's floor (`probe-floor`): the empty program loads and attaches to every
/// tracepoint the daemon uses (the verifier and the kernel take it; a build that dropped it
/// from the object, or a tracepoint it cannot attach to, fails here rather than in a bench).
#[test]
fn the_empty_program_floor_attaches_to_every_tracepoint() {
    if !privileged_or_skip("the_empty_program_floor_attaches_to_every_tracepoint") {
        return;
    }
    let floor = tracer::probe::Floor::attach().expect("the floor attaches");
    // Attached: the syscalls it hooks still work with it in place.
    let _ = std::fs::read_to_string("/proc/self/stat").expect("a read with the floor attached");
    drop(floor);
}

/// One run of the testbed's script under `launcher` (a shell line that ends by exec'ing the
/// testbed with the arguments `"$@"`): its pid and the fd of the connection it accepted.
fn serve_once(launcher: &str, testbed: &str, dev_root: &str) -> (u32, u64) {
    let (mut bed, mut lines, port) = spawn_testbed(
        Command::new("sh")
            .args(["-c", launcher, "sh", "--device-root", dev_root])
            .env("TESTBED", testbed),
    );
    let pid = bed.id();
    let mut stdin = bed.stdin.take().expect("stdin");
    writeln!(stdin, "go").expect("go");
    let mut client = TcpStream::connect(("127.0.0.1", port as u16)).expect("connect");
    client.write_all(REQUEST).expect("send request");
    let mut response = Vec::new();
    client.read_to_end(&mut response).expect("read response");
    let fd = expect_line(&mut lines, "accepted")[0];
    for line in lines.by_ref() {
        if line == "done" {
            break;
        }
    }
    drop(stdin);
    let _ = bed.wait();
    (pid, fd)
}

/// Processes that become targets in the kernel, not through the daemon: a cgroup member
/// started after attach and a process exec'd under a traced name. Their first syscalls get past
/// the probes' not-a-target byte (set by the probes themselves), so their connection is seen
/// whole, and an unrelated process next to them is not.
#[test]
fn targets_by_cgroup_and_by_name_are_traced_from_their_first_syscall() {
    if !privileged_or_skip("targets_by_cgroup_and_by_name_are_traced_from_their_first_syscall") {
        return;
    }
    let dir = TempDir::new("probes-cgroup-comm");
    let dev_root = standin_devices(&dir);
    let dev_root = dev_root.as_str();
    // The cgroup v2 hierarchy: /sys/fs/cgroup, or its `unified` mount on a hybrid host.
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists())
        .expect("a cgroup v2 hierarchy");
    let cgroup = root.join(format!("tracer-test-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).expect("create a cgroup");
    // The same program under a name of its own (comm is the executable's file name).
    let named = dir.path().join("namedbed");
    std::fs::copy(TESTBED, &named).expect("copy the testbed");
    let named = named.to_str().expect("utf8").to_string();

    let cgroup_s = cgroup.to_str().expect("utf8").to_string();
    let tracer = Tracer::start(
        TRACER,
        dir.path(),
        &[
            "--cgroup",
            &cgroup_s,
            "--comm",
            "namedbed",
            "--device-root",
            dev_root,
            "--poll-interval-ms",
            "5",
            "--summary-interval-ms",
            "200",
        ],
    );
    let in_cgroup = format!("echo $$ > {cgroup_s}/cgroup.procs && exec \"$TESTBED\" \"$@\"");
    let (by_cgroup, cgroup_fd) = serve_once(&in_cgroup, TESTBED, dev_root);
    let (by_name, name_fd) = serve_once("exec \"$TESTBED\" \"$@\"", &named, dev_root);
    let (neither, _) = serve_once("exec \"$TESTBED\" \"$@\"", TESTBED, dev_root);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let events = tracer.stop();
    let _ = std::fs::remove_dir(&cgroup);

    for (pid, fd, how) in [(by_cgroup, cgroup_fd, "cgroup"), (by_name, name_fd, "name")] {
        let conns = events_of(&events, "conn", pid);
        assert_eq!(
            conns.len(),
            1,
            "by {how}: one accepted connection: {conns:?}"
        );
        assert_eq!(num(conns[0], "fd"), fd, "by {how}");
        let data = events_of(&events, "data", pid);
        let inbound: Vec<_> = data.iter().filter(|d| d["inbound"] == true).collect();
        assert_eq!(inbound.len(), 1, "by {how}: the request read: {data:?}");
        assert_eq!(num(inbound[0], "total_len"), REQUEST.len() as u64);
        assert_eq!(
            data.iter().filter(|d| d["inbound"] == false).count(),
            2,
            "by {how}: write + writev: {data:?}"
        );
        assert_eq!(events_of(&events, "close", pid).len(), 1, "by {how}");
        assert_eq!(events_of(&events, "dev_open", pid).len(), 1, "by {how}");
    }
    assert!(
        events.iter().all(|e| num(e, "tgid") as u32 != neither),
        "the process that is neither was not traced"
    );
}
