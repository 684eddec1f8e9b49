use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::{
            net::{UnixListener, UnixStream},
            process::CommandExt as _,
        },
    },
    process::{Child, Command, Stdio},
};

use super::{tcp::TcpTable, walk::cgroup_under, *};
use crate::procfs::{TCP_ESTABLISHED, TCP_LISTEN, TcpEntry, is_loopback};

// ---- /proc/net/tcp parsing ----------------------------------------------------------------

/// Captured on x86-64 (little endian) with a dual-stack listener on port 44037 and one v4 and
/// one v6 loopback client.
const TCP4: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1594 1 00000000817e4110 100 0 0 10 0
   1: 0100007F:D4C6 0100007F:AC05 01 00000000:00000000 00:00000000 00000000     0        0 215105 2 00000000d348718b 20 0 0 10 -1
   2: 0500000A:0016 0100000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 31337 4 0000000000000000 20 4 29 10 -1
   3: 0100007F:1F90 0100007F:9C40 06 00000000:00000000 03:000012B4 00000000     0        0 0 3 0000000000000000
   bogus
";
const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:AC05 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 215104 1 00000000da2d0467 100 0 0 10 0
   1: 00000000000000000000000001000000:AC05 00000000000000000000000001000000:C72C 01 00000000:00000000 00:00000000 00000000     0        0 215108 1 00000000228855e0 20 0 0 10 -1
   2: 00000000000000000000000001000000:C72C 00000000000000000000000001000000:AC05 01 00000000:00000000 00:00000000 00000000     0        0 215106 2 000000008d333849 20 0 0 10 -1
   3: 0000000000000000FFFF00000100007F:AC05 0000000000000000FFFF00000100007F:D4C6 01 00000000:00000000 00:00000000 00000000     0        0 215107 1 0000000057ce248f 20 0 0 10 -1
   4: B80D0120000000000000000001000000:01BB B80D0120000000000000000002000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 20 0 0 10 -1
";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
#[cfg(target_endian = "little")]
fn tcp_entries_v4_and_v6_with_loopback_detection() {
    let v4 = procfs::parse_tcp(TCP4, false);
    assert_eq!(v4.len(), 4);
    assert_eq!(v4[0].local, sa("0.0.0.0:2024"));
    assert_eq!(v4[0].state, TCP_LISTEN);
    assert_eq!(
        v4[1],
        TcpEntry {
            local: sa("127.0.0.1:54470"),
            remote: sa("127.0.0.1:44037"),
            state: TCP_ESTABLISHED,
            inode: 215_105,
            v6: false,
        }
    );
    assert_eq!(v4[2].local, sa("10.0.0.5:22"));
    assert!(!is_loopback(v4[2].local.ip()) && !is_loopback(v4[2].remote.ip()));
    assert_eq!(v4[3].inode, 0, "time-wait sockets have no inode");

    let v6 = procfs::parse_tcp(TCP6, true);
    assert_eq!(v6.len(), 5);
    assert_eq!(v6[0].local, sa("[::]:44037"));
    assert_eq!(v6[1].local, sa("[::1]:44037"));
    assert_eq!(v6[1].remote, sa("[::1]:50988"));
    // The v4-mapped accepted end reads as v4, so it pairs with the v4 client's entry.
    assert_eq!(v6[3].local, sa("127.0.0.1:44037"));
    assert_eq!(v6[3].remote, v4[1].local);
    assert_eq!(v6[4].local, sa("[2001:db8::1]:443"));
    assert!(!is_loopback(v6[4].local.ip()));
    for e in [&v4[1], &v6[1], &v6[2], &v6[3]] {
        assert!(
            is_loopback(e.local.ip()) && is_loopback(e.remote.ip()),
            "{e:?}"
        );
    }
    assert!(is_loopback("::ffff:127.3.0.1".parse().expect("ip")));

    let table = TcpTable::new(v4.into_iter().chain(v6).collect());
    let client = table.by_inode(215_105).expect("client");
    assert_eq!(table.peer_of(client).map(|e| e.inode), Some(215_107));
    assert!(table.listens(sa("127.0.0.1:44037")), "wildcard v6 listener");
    assert!(!table.listens(client.local));
}

#[test]
fn globs_and_cgroup_paths() {
    assert!(glob_match("/run/systemd/*", "/run/systemd/journal/stdout"));
    assert!(glob_match("/run/user/*/bus", "/run/user/1000/bus"));
    assert!(!glob_match("/run/user/*/bus", "/run/user/1000/bus2"));
    assert!(glob_match("/dev/log", "/dev/log"));
    assert!(!glob_match("/dev/log", "/dev/logx"));
    assert!(glob_match("*", ""));
    assert!(glob_match("a*b*c", "aXXbYYc"));
    assert!(!glob_match("a*b*c", "aXXbYY"));
    assert!(cgroup_under("/system.slice/vllm.service", "/system.slice"));
    assert!(cgroup_under("/system.slice", "/system.slice"));
    assert!(!cgroup_under("/system.slice2/x", "/system.slice"));
    assert!(cgroup_under("/anything", "/"));
}

// ---- fake procfs trees ----------------------------------------------------------------------

struct Tree {
    dir: tempfile::TempDir,
    tcp: Vec<String>,
    unix: Vec<UnixSocket>,
}

impl Tree {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("proc/net")).expect("mkdir");
        fs::create_dir_all(dir.path().join("dev")).expect("mkdir");
        for n in ["nvidia0", "nvidia1", "nvidiactl"] {
            fs::write(dir.path().join("dev").join(n), "").expect("write");
        }
        Self {
            dir,
            tcp: Vec::new(),
            unix: Vec::new(),
        }
    }

    fn procfs(&self) -> ProcFs {
        ProcFs {
            proc_root: self.dir.path().join("proc"),
            cgroup_root: self.dir.path().join("cgroup"),
        }
    }

    fn dev(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    fn pdir(&self, pid: u32) -> PathBuf {
        self.dir.path().join(format!("proc/{pid}"))
    }

    /// A process with `sockets` as (fd, inode).
    fn proc(&self, pid: u32, comm: &str, ppid: u32, sockets: &[(u32, u64)]) -> &Self {
        self.proc_flags(pid, comm, ppid, 0x0040_0100, sockets)
    }

    fn proc_flags(
        &self,
        pid: u32,
        comm: &str,
        ppid: u32,
        flags: u64,
        sockets: &[(u32, u64)],
    ) -> &Self {
        let p = self.pdir(pid);
        fs::create_dir_all(p.join("fd")).expect("mkdir");
        fs::write(
            p.join("stat"),
            format!("{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 0 0 0"),
        )
        .expect("write");
        for (fd, inode) in sockets {
            std::os::unix::fs::symlink(
                format!("socket:[{inode}]"),
                p.join("fd").join(fd.to_string()),
            )
            .expect("symlink");
        }
        self
    }

    fn gpu_fd(&self, pid: u32, fd: u32, node: &str) -> &Self {
        std::os::unix::fs::symlink(
            self.dev().join(node),
            self.pdir(pid).join("fd").join(fd.to_string()),
        )
        .expect("symlink");
        self
    }

    /// A mapping of the node (a context), appended to the process's maps.
    fn gpu_map(&self, pid: u32, node: &str) -> &Self {
        let path = self.pdir(pid).join("maps");
        let mut text = fs::read_to_string(&path).unwrap_or_default();
        let _ = writeln!(
            text,
            "7f00a0000000-7f00a0200000 rw-s 00000000 00:05 812 {}",
            self.dev().join(node).display()
        );
        fs::write(path, text).expect("write");
        self
    }

    fn cgroup(&self, pid: u32, path: &str) -> &Self {
        fs::write(self.pdir(pid).join("cgroup"), format!("0::{path}\n")).expect("write");
        self
    }

    fn tcp_line(&mut self, local: &str, remote: &str, state: u8, inode: u64) {
        fn hex(a: SocketAddr) -> String {
            let IpAddr::V4(ip) = a.ip() else {
                panic!("v4 only in fake tables")
            };
            format!("{:08X}:{:04X}", u32::from_ne_bytes(ip.octets()), a.port())
        }
        self.tcp.push(format!(
            "{:4}: {} {} {state:02X} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 20 4 30 10 -1",
            self.tcp.len(),
            hex(sa(local)),
            hex(sa(remote)),
        ));
        let mut text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n".to_string();
        for l in &self.tcp {
            text.push_str(l);
            text.push('\n');
        }
        fs::write(self.dir.path().join("proc/net/tcp"), text).expect("write");
    }

    /// A loopback connection `client` → `server`; returns nothing, inodes given.
    fn tcp_conn(&mut self, client: &str, server: &str, client_inode: u64, server_inode: u64) {
        self.tcp_line(client, server, TCP_ESTABLISHED, client_inode);
        self.tcp_line(server, client, TCP_ESTABLISHED, server_inode);
    }

    fn tcp_listen(&mut self, addr: &str, inode: u64) {
        self.tcp_line(addr, "0.0.0.0:0", TCP_LISTEN, inode);
    }

    /// A connected Unix stream pair; `name_b` is the (listener's) name on `b`'s side.
    fn unix_pair(&mut self, a: u64, b: u64, name_b: Option<&str>) {
        self.unix.push(UnixSocket {
            inode: a,
            kind: unix_diag::SOCK_STREAM,
            state: 1,
            peer: Some(b),
            name: None,
        });
        self.unix.push(UnixSocket {
            inode: b,
            kind: unix_diag::SOCK_STREAM,
            state: 1,
            peer: Some(a),
            name: name_b.map(str::to_string),
        });
    }

    fn opts(&self) -> DiscoverOptions {
        DiscoverOptions {
            self_pid: 999_999,
            device_root: self.dev(),
            unix: UnixSource::Table(self.unix.clone()),
            ..DiscoverOptions::default()
        }
    }

    fn discover(&self, roots: &[ServiceRoot]) -> Discovery {
        discover(&self.procfs(), roots, &self.opts()).expect("discovers")
    }
}

fn root(spec: RootSpec, pids: &[u32]) -> ServiceRoot {
    ServiceRoot {
        spec,
        pids: pids.iter().copied().collect(),
    }
}

fn pids(s: &Service) -> Vec<u32> {
    s.members.keys().copied().collect()
}

/// vLLM-like: API server 10 on port 8000 (NVML fd on GPU 1) with child engine 11 with a
/// context on GPU 0; a load generator 50 connected into 8000; untraced processes on GPU 0:
/// 60 with an fd (a monitor), 61 with a context.
fn vllm_like() -> Tree {
    let mut t = Tree::new();
    t.proc(10, "python3", 1, &[(5, 100), (6, 101), (7, 300)])
        .proc(11, "VLLM::EngineCor", 10, &[(4, 301)])
        .gpu_fd(11, 20, "nvidia0")
        .gpu_fd(11, 21, "nvidiactl")
        .gpu_map(11, "nvidia0")
        .gpu_fd(10, 9, "nvidiactl")
        .gpu_fd(10, 8, "nvidia1")
        .proc(50, "loadgen", 1, &[(3, 501)])
        .proc(60, "monitor", 1, &[])
        .gpu_fd(60, 3, "nvidia0")
        .proc(61, "untraced", 1, &[])
        .gpu_map(61, "nvidia0");
    t.tcp_listen("127.0.0.1:8000", 100);
    t.tcp_conn("127.0.0.1:40000", "127.0.0.1:8000", 501, 101);
    t.unix_pair(300, 301, Some("/tmp/ipc-1234"));
    t
}

#[test]
fn client_of_the_endpoint_port_is_never_a_member() {
    let t = vllm_like();
    for spec in [RootSpec::Port(8000), RootSpec::Pid(10)] {
        let d = t.discover(&[root(spec, &[10])]);
        assert_eq!(d.services.len(), 1);
        let s = &d.services[0];
        assert_eq!(pids(s), [10, 11], "{}", render_text(&d));
        assert_eq!(s.ports, [8000]);
        assert_eq!(s.gpus, BTreeSet::from([0]));
        assert_eq!(s.fd_only_gpus, BTreeSet::from([1]));
        assert!(s.gpu_evidence[&10].ctl && s.gpu_evidence[&10].mapped().is_empty());
        assert_eq!(d.others, BTreeMap::from([(0, vec![60, 61])]));
        assert_eq!(d.other_holders[&60].comm, "monitor");
        assert!(d.other_holders[&61].gpus.mapped().contains(&0));
    }
    // Rooted at the load generator, nothing declares port 8000 an endpoint: the server is a
    // peer of the client.
    let d = t.discover(&[root(RootSpec::Pid(50), &[50])]);
    assert_eq!(pids(&d.services[0]), [10, 11, 50]);
    // Declared together, they stay two services.
    let d = t.discover(&[
        root(RootSpec::Port(8000), &[10]),
        root(RootSpec::Pid(50), &[50]),
    ]);
    assert_eq!(d.services.len(), 2);
    assert_eq!(pids(&d.services[1]), [50]);
}

#[test]
fn reasons_and_text_output() {
    let t = vllm_like();
    let gpus = t.dir.path().join("proc/driver/nvidia/gpus/0000:18:00.0");
    fs::create_dir_all(&gpus).expect("mkdir");
    fs::write(
        gpus.join("information"),
        "Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t GPU-aaaa\nBus Location: \t 0000:18:00.0\nDevice Minor: \t 0\n",
    )
    .expect("write");
    let d = t.discover(&[root(RootSpec::Port(8000), &[10])]);
    let s = &d.services[0];
    assert_eq!(
        s.members[&10].reasons,
        [Reason::Target {
            why: "listens on port 8000".into()
        }]
    );
    // The engine is both a child and a Unix peer of the API server.
    assert_eq!(
        s.members[&11].reasons,
        [
            Reason::Descendant { of: 10 },
            Reason::UnixPeer {
                peer: 10,
                inode: 301,
                name: Some("/tmp/ipc-1234".into())
            }
        ]
    );
    let text = render_text(&d);
    assert!(text.contains("service 1: port 8000"), "{text}");
    assert!(
        text.contains("GPU 0 GPU-aaaa NVIDIA H100 80GB HBM3 [0000:18:00.0]"),
        "{text}"
    );
    assert!(
        text.contains("VLLM::EngineCor  0 (fd 20, mapped) ctl"),
        "{text}"
    );
    assert!(text.contains("child of 10; unix peer of 10"), "{text}");
    assert!(
        text.contains("fd only (no context, not counted): 1"),
        "{text}"
    );
    assert!(
        text.contains("60 monitor (fd only), 61 untraced (mapped)"),
        "{text}"
    );
    let json = serde_json::to_value(&d).expect("json");
    assert_eq!(
        json["services"][0]["members"]["11"]["reasons"][0]["kind"],
        "descendant"
    );
    assert_eq!(json["others"]["0"][0], 60);
}

#[test]
fn transitive_peers_stop_at_the_depth_bound() {
    let mut t = Tree::new();
    // 10 — 20 — 30 — 40 — 50 — 60, each link a socketpair (no names, no fan-in).
    let chain = [10u32, 20, 30, 40, 50, 60];
    for (i, &pid) in chain.iter().enumerate() {
        let mut socks = Vec::new();
        if i > 0 {
            socks.push((3, u64::from(pid) * 10));
        }
        if i + 1 < chain.len() {
            socks.push((4, u64::from(pid) * 10 + 1));
        }
        t.proc(pid, "p", 1, &socks);
    }
    for w in chain.windows(2) {
        t.unix_pair(u64::from(w[0]) * 10 + 1, u64::from(w[1]) * 10, None);
    }
    let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
    assert_eq!(pids(&d.services[0]), [10, 20, 30, 40, 50]);
    assert_eq!(
        d.services[0].members[&50].reasons,
        [Reason::UnixPeer {
            peer: 40,
            inode: 500,
            name: None
        }]
    );
    let mut opts = t.opts();
    opts.max_depth = 2;
    let d = discover(&t.procfs(), &[root(RootSpec::Pid(10), &[10])], &opts).expect("ok");
    assert_eq!(pids(&d.services[0]), [10, 20, 30]);
    opts.max_depth = 0;
    let d = discover(&t.procfs(), &[root(RootSpec::Pid(10), &[10])], &opts).expect("ok");
    assert_eq!(pids(&d.services[0]), [10]);
}

#[test]
fn roots_that_are_ipc_peers_merge() {
    let mut t = Tree::new();
    // TGI-like: router 10 (port 3000) connects to shard 70's Unix listener; shard 70 is also
    // given by pid; 80 is unrelated.
    t.proc(10, "text-generation", 5, &[(3, 100), (9, 110)])
        .proc(70, "python", 5, &[(3, 170), (4, 171)])
        .gpu_fd(70, 12, "nvidia1")
        .gpu_map(70, "nvidia1")
        .proc(80, "unrelated", 1, &[])
        .proc(5, "launcher", 1, &[]);
    t.tcp_listen("0.0.0.0:3000", 100);
    t.unix_pair(110, 171, Some("/tmp/text-generation-server-0"));
    let d = t.discover(&[
        root(RootSpec::Port(3000), &[10]),
        root(RootSpec::Pid(80), &[80]),
        root(RootSpec::Pid(70), &[70]),
    ]);
    assert_eq!(d.services.len(), 2, "{}", render_text(&d));
    let s = &d.services[0];
    assert_eq!(s.name, "port 3000 + pid 70");
    assert_eq!(s.roots, [RootSpec::Port(3000), RootSpec::Pid(70)]);
    assert_eq!(pids(s), [10, 70]);
    assert_eq!(s.gpus, BTreeSet::from([1]));
    assert_eq!(s.members[&70].reasons.len(), 2, "target and unix peer");
    assert_eq!(d.services[1].id, 2);
    assert_eq!(pids(&d.services[1]), [80]);
    // The launcher (parent) is not pulled in.
    assert!(!s.members.contains_key(&5));
}

#[test]
fn system_sockets_and_stdio_are_not_links() {
    let mut t = Tree::new();
    t.proc(10, "server", 1, &[(4, 100), (5, 101), (6, 102), (7, 103)])
        .proc(90, "systemd-journal", 1, &[(20, 900), (21, 901)])
        .proc(91, "worker", 1, &[(8, 910)])
        .proc(93, "dbus-daemon", 1, &[(9, 930)]);
    // Not stdio, so only the names keep journald (stream and syslog) and D-Bus out; the
    // unnamed socketpair to 91 is a link.
    t.unix_pair(100, 900, Some("/run/systemd/journal/stdout"));
    t.unix_pair(101, 901, Some("/dev/log"));
    t.unix_pair(103, 930, Some("/run/dbus/system_bus_socket"));
    t.unix_pair(102, 910, None);
    let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
    assert_eq!(pids(&d.services[0]), [10, 91]);
    // Unnamed, but held only as stdio on one side or the other: not a link.
    let mut t = Tree::new();
    t.proc(10, "server", 1, &[(2, 100), (5, 200)])
        .proc(91, "sshd", 1, &[(8, 101)])
        .proc(92, "logger", 1, &[(0, 201)]);
    t.unix_pair(100, 101, None);
    t.unix_pair(200, 201, None);
    let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
    assert_eq!(pids(&d.services[0]), [10]);
}

#[test]
fn a_shared_server_joins_but_not_its_other_clients() {
    let mut t = Tree::new();
    // 10 (root) connects to 20's Unix listener and to 25's TCP port 6379; 30 and 35 are other
    // clients of 20 and 25; 20 itself connects out to 40 (followed).
    t.proc(10, "app", 1, &[(3, 100), (4, 150)])
        .proc(20, "db", 1, &[(3, 200), (4, 201), (5, 202)])
        .proc(25, "redis", 1, &[(3, 250), (4, 251), (5, 252)])
        .proc(30, "other-client", 1, &[(3, 300)])
        .proc(35, "other-client", 1, &[(3, 350)])
        .proc(40, "db-helper", 1, &[(3, 400)]);
    t.unix_pair(100, 200, Some("/tmp/db.sock"));
    t.unix_pair(300, 201, Some("/tmp/db.sock"));
    t.unix_pair(202, 400, None);
    t.tcp_listen("127.0.0.1:6379", 250);
    t.tcp_conn("127.0.0.1:41000", "127.0.0.1:6379", 150, 251);
    t.tcp_conn("127.0.0.1:41001", "127.0.0.1:6379", 350, 252);
    let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
    let s = &d.services[0];
    assert_eq!(pids(s), [10, 20, 25, 40], "{}", render_text(&d));
    assert_eq!(
        s.members[&25].reasons,
        [Reason::LoopbackPeer {
            peer: 10,
            port: 6379
        }]
    );
    // Rooted at the server itself, its clients are peers (TGI shard given by pid).
    let d = t.discover(&[root(RootSpec::Pid(20), &[20])]);
    assert_eq!(pids(&d.services[0]), [10, 20, 25, 30, 40]);
}

#[test]
fn pid_1_self_and_kernel_threads_are_never_members() {
    let mut t = Tree::new();
    t.proc(1, "systemd", 0, &[(3, 10)])
        .proc(10, "server", 1, &[(3, 100), (4, 101), (5, 102)])
        .proc(11, "child", 10, &[])
        .proc_flags(12, "kthread-ish", 10, procfs::PF_KTHREAD, &[])
        .proc(2, "kthreadd", 0, &[])
        .proc(77, "kworker/0:1", 2, &[(3, 770)])
        .proc(999_999, "tracer", 10, &[(3, 1000)]);
    t.unix_pair(100, 10, None);
    t.unix_pair(101, 770, None);
    t.unix_pair(102, 1000, None);
    let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
    assert_eq!(pids(&d.services[0]), [10, 11]);
    let d = t.discover(&[root(RootSpec::Pid(1), &[1])]);
    assert!(d.services[0].members.is_empty());
    assert_eq!(d.warnings, ["pid 1 has no processes"]);
}

#[test]
fn cgroup_roots_take_the_cgroup_and_below() {
    let t = Tree::new();
    t.proc(10, "a", 1, &[])
        .cgroup(10, "/system.slice/vllm.service")
        .proc(11, "b", 1, &[])
        .cgroup(11, "/system.slice/vllm.service/worker")
        .proc(12, "c", 1, &[])
        .cgroup(12, "/system.slice/vllm.service2")
        .proc(13, "d", 11, &[])
        .cgroup(13, "/user.slice");
    let cg = t.dir.path().join("cgroup/system.slice/vllm.service");
    for spec in [
        RootSpec::Cgroup(cg),
        RootSpec::Cgroup("system.slice/vllm.service".into()),
    ] {
        let d = t.discover(&[root(spec, &[])]);
        let s = &d.services[0];
        assert_eq!(pids(s), [10, 11, 13]);
        assert_eq!(
            s.members[&10].reasons,
            [Reason::Cgroup {
                path: "/system.slice/vllm.service".into()
            }]
        );
        assert_eq!(s.members[&13].reasons, [Reason::Descendant { of: 11 }]);
    }
    assert!(matches!(
        discover(&t.procfs(), &[], &t.opts()),
        Err(ServiceError::NoRoots)
    ));
}

/// The service's workload is its first root's: a pid root in a kubepods container (its child
/// elsewhere does not change it), a cgroup root through its lowest member, and nothing for a
/// process in a login session.
#[test]
fn a_services_workload_is_its_first_roots_cgroup() {
    let id = "ab".repeat(32);
    let t = Tree::new();
    t.proc(10, "python3", 1, &[])
        .cgroup(
            10,
            &format!(
                "/kubepods.slice/kubepods-pod0a1b2c3d_0000_4000_8000_000000000001.slice/cri-containerd-{id}.scope"
            ),
        )
        .proc(11, "engine", 10, &[])
        .cgroup(11, "/system.slice/other.service")
        .proc(20, "tgi", 1, &[])
        .cgroup(20, "/system.slice/tgi.service")
        .proc(30, "shell", 1, &[])
        .cgroup(30, "/user.slice/user-0.slice/session-1.scope");
    let d = t.discover(&[
        root(RootSpec::Pid(10), &[10]),
        root(RootSpec::Cgroup("system.slice/tgi.service".into()), &[]),
        root(RootSpec::Pid(30), &[30]),
    ]);
    let w = d.services[0].workload.as_ref().expect("the pod");
    assert_eq!(
        w.pod_uid.as_deref(),
        Some("0a1b2c3d-0000-4000-8000-000000000001")
    );
    assert_eq!(w.container_id.as_deref(), Some(id.as_str()));
    assert!(
        render_text(&d)
            .contains("workload: pod 0a1b2c3d-0000-4000-8000-000000000001, container abababababab")
    );
    let unit = d.services[1].workload.as_ref().expect("the unit");
    assert_eq!(unit.unit.as_deref(), Some("tgi.service"));
    assert_eq!(d.services[2].workload, None);
}

// ---- the real kernel ------------------------------------------------------------------------

/// A `sleep` child holding `fds` as its fds 3, 4, …; killed on drop.
struct Kid(Child);

impl Kid {
    fn spawn(fds: &[RawFd]) -> Self {
        let fds = fds.to_vec();
        let mut cmd = Command::new("sleep");
        cmd.arg("60")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2) run, on a
        // vector allocated before the fork; no allocation happens in the closure.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0; 8];
                for (i, &fd) in fds.iter().enumerate().take(high.len()) {
                    high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &h) in high.iter().enumerate().take(fds.len()) {
                    if libc::dup2(h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Self(cmd.spawn().expect("spawn sleep"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn real_opts() -> DiscoverOptions {
    DiscoverOptions {
        // The test process must be allowed to be a member.
        self_pid: 0,
        device_root: PathBuf::from("/nonexistent-dev"),
        ..DiscoverOptions::default()
    }
}

fn real(roots: &[ServiceRoot], opts: &DiscoverOptions) -> Discovery {
    let d = discover(&ProcFs::default(), roots, opts).expect("discovers");
    assert!(
        d.warnings.iter().all(|w| !w.contains("Unix")),
        "{:?}",
        d.warnings
    );
    d
}

#[test]
fn kernel_socketpair_peer_is_found() {
    let (mine, theirs) = UnixStream::pair().expect("socketpair");
    let kid = Kid::spawn(&[theirs.as_raw_fd()]);
    drop(theirs);
    let me = std::process::id();
    let d = real(
        &[root(RootSpec::Pid(kid.pid()), &[kid.pid()])],
        &real_opts(),
    );
    let s = &d.services[0];
    assert!(
        s.members.get(&me).is_some_and(|m| m
            .reasons
            .iter()
            .any(|r| matches!(r, Reason::UnixPeer { peer, .. } if *peer == kid.pid()))),
        "{}",
        render_text(&d)
    );
    assert_eq!(s.members[&kid.pid()].comm, "sleep");
    drop(mine);
}

/// A process started by `unshare --net` (a network namespace of its own, as a container's)
/// running `script` with `arg`, once it printed a line; killed on drop.
fn in_own_netns(script: &str, arg: &std::path::Path) -> Kid {
    use std::io::BufRead as _;
    let mut child = Command::new("unshare")
        .args(["--net", "python3", "-c", script])
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready");
    Kid(child)
}

/// A server in one network namespace and the process connected to its Unix socket in another
/// (an engine and its API server in two containers sharing a volume): the link is found from
/// inside both namespaces, and not without that (the daemon's own namespace holds neither end).
#[test]
fn unix_peers_in_other_network_namespaces_are_followed() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!("SKIPPED: making network namespaces needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("engine.sock");
    let server = in_own_netns(
        "import socket,sys,time\n\
         s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1]);s.listen()\n\
         print('ready',flush=True);c,_=s.accept();open(sys.argv[1]+'.ok','w').close()\n\
         time.sleep(60)",
        &path,
    );
    let client = in_own_netns(
        "import socket,sys,time\n\
         c=socket.socket(socket.AF_UNIX);c.connect(sys.argv[1])\n\
         print('ready',flush=True);time.sleep(60)",
        &path,
    );
    let accepted = path.with_extension("sock.ok");
    for _ in 0..500 {
        if accepted.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(accepted.exists(), "the server accepted");
    let netns = |pid: u32| fs::read_link(format!("/proc/{pid}/ns/net")).expect("netns");
    assert_ne!(netns(server.pid()), netns(client.pid()));
    assert_ne!(netns(server.pid()), netns(std::process::id()));
    let roots = [root(RootSpec::Pid(server.pid()), &[server.pid()])];
    let d = real(&roots, &real_opts());
    let s = &d.services[0];
    let found = s.members.get(&client.pid()).map(|m| m.reasons.clone());
    assert!(
        matches!(found.as_deref(), Some([Reason::UnixPeer { peer, name: Some(name), .. }])
            if *peer == server.pid() && name.ends_with("engine.sock")),
        "{}",
        render_text(&d)
    );
    assert!(s.ipc_fds.iter().any(|&(pid, _)| pid == client.pid()));
    let own_only = real(
        &roots,
        &DiscoverOptions {
            other_netns: false,
            ..real_opts()
        },
    );
    assert_eq!(pids(&own_only.services[0]), [server.pid()]);
}

#[test]
fn kernel_unix_listener_peer_and_system_socket_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("engine.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let client = UnixStream::connect(&path).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    let kid = Kid::spawn(&[client.as_raw_fd()]);
    drop(client);
    let me = std::process::id();
    let roots = [root(RootSpec::Pid(kid.pid()), &[kid.pid()])];
    let d = real(&roots, &real_opts());
    let reasons = &d.services[0]
        .members
        .get(&me)
        .expect("listener side joins")
        .reasons;
    let name = path.to_string_lossy().into_owned();
    assert!(
        reasons.iter().any(|r| matches!(r,
            Reason::UnixPeer { peer, name: Some(n), .. } if *peer == kid.pid() && *n == name)),
        "{reasons:?}"
    );
    let mut opts = real_opts();
    opts.system_sockets
        .push(format!("{}/*", dir.path().display()));
    let d = real(&roots, &opts);
    assert_eq!(pids(&d.services[0]), [kid.pid()]);
    drop(accepted);
}

#[test]
fn kernel_loopback_tcp_peer_and_endpoint_client_exclusion() {
    // Peer: the child holds a client connection into a listener of the test process.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    let port = listener.local_addr().expect("addr").port();
    let kid = Kid::spawn(&[client.as_raw_fd()]);
    drop(client);
    let me = std::process::id();
    let d = real(
        &[root(RootSpec::Pid(kid.pid()), &[kid.pid()])],
        &real_opts(),
    );
    assert!(
        d.services[0]
            .members
            .get(&me)
            .is_some_and(|m| m.reasons.contains(&Reason::LoopbackPeer {
                peer: kid.pid(),
                port
            })),
        "{}",
        render_text(&d)
    );
    drop((accepted, listener, kid));

    // Exclusion: server child A holds the listener and the accepted end; client child B
    // connected into A's endpoint port.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    let a = Kid::spawn(&[accepted.as_raw_fd(), listener.as_raw_fd()]);
    let b = Kid::spawn(&[client.as_raw_fd()]);
    drop((accepted, listener, client));
    let server = root(RootSpec::Port(port), &[a.pid()]);
    let d = real(std::slice::from_ref(&server), &real_opts());
    assert_eq!(pids(&d.services[0]), [a.pid()], "{}", render_text(&d));
    assert_eq!(d.services[0].ports, [port]);
    let by_pid = root(RootSpec::Pid(a.pid()), &[a.pid()]);
    let d = real(&[by_pid], &real_opts());
    assert_eq!(
        pids(&d.services[0]),
        [a.pid()],
        "listening port is an endpoint"
    );
    // From the client's side with nothing declared, the server is a peer; declared together,
    // they are two services.
    let loadgen = root(RootSpec::Pid(b.pid()), &[b.pid()]);
    let d = real(std::slice::from_ref(&loadgen), &real_opts());
    let mut want = vec![a.pid(), b.pid()];
    want.sort_unstable();
    assert_eq!(pids(&d.services[0]), want);
    let d = real(&[server, loadgen], &real_opts());
    assert_eq!(d.services.len(), 2);
}

#[test]
#[ignore = "needs a live CUDA process: set TRACER_LIVE_GPU_PID"]
fn live_service_of_a_gpu_process() {
    let Ok(pid) = std::env::var("TRACER_LIVE_GPU_PID") else {
        return;
    };
    let pid: u32 = pid.parse().expect("pid");
    let d = discover(
        &ProcFs::default(),
        &[root(RootSpec::Pid(pid), &[pid])],
        &DiscoverOptions::default(),
    )
    .expect("discovers");
    println!("{}", render_text(&d));
    assert!(!d.services[0].gpus.is_empty());
    assert!(!d.inventory.is_empty());
}

#[test]
fn roots_from_spec_resolves_each_target_separately() {
    let t = vllm_like();
    t.proc(20, "other", 1, &[]);
    let spec = TargetSpec {
        pids: vec![20],
        ports: vec![8000],
        ..TargetSpec::default()
    };
    let roots = roots_from_spec(&t.procfs(), &spec, 999_999).expect("roots");
    assert_eq!(
        roots,
        [
            root(RootSpec::Pid(20), &[20]),
            root(RootSpec::Port(8000), &[10])
        ]
    );
    let bad = TargetSpec {
        ports: vec![9],
        ..TargetSpec::default()
    };
    assert!(matches!(
        roots_from_spec(&t.procfs(), &bad, 999_999),
        Err(ServiceError::Target(TargetError::NoListener(9)))
    ));
}

#[test]
fn ipc_fds_are_the_unix_links_between_members_both_ends() {
    let t = vllm_like();
    let d = t.discover(&[root(RootSpec::Port(8000), &[10])]);
    // The API's socket 300 (fd 7) and the engine's 301 (fd 4); not the TCP client link.
    assert_eq!(d.services[0].ipc_fds, BTreeSet::from([(10, 7), (11, 4)]));
    // A link to a process outside the service, a system socket and stdio are not IPC fds.
    let mut t = Tree::new();
    t.proc(10, "server", 1, &[(2, 100), (5, 101), (6, 102), (7, 103)])
        .proc(11, "worker", 10, &[(3, 110), (8, 111)])
        .proc(90, "systemd-journal", 1, &[(20, 900)])
        .proc(91, "sshd", 1, &[(9, 910)]);
    t.unix_pair(100, 110, None); // stdio on the server's side: only the worker's fd 3
    t.unix_pair(101, 111, None); // a socketpair to the child
    t.unix_pair(102, 900, Some("/run/systemd/journal/stdout"));
    t.unix_pair(103, 910, None);
    let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
    let s = &d.services[0];
    assert_eq!(pids(s), [10, 11, 91], "{}", render_text(&d));
    assert_eq!(
        s.ipc_fds,
        BTreeSet::from([(10, 5), (10, 7), (11, 3), (11, 8), (91, 9)])
    );
}
