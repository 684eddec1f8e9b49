use super::*;

const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A2C4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 20 4 30 10 -1
   garbage line
";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
#[cfg(target_endian = "little")]
fn tcp_table_is_parsed_and_garbage_skipped() {
    assert_eq!(
        parse_tcp(TCP, false),
        vec![
            TcpEntry {
                local: sa("0.0.0.0:8080"),
                remote: sa("0.0.0.0:0"),
                state: TCP_LISTEN,
                inode: 12345,
                v6: false
            },
            TcpEntry {
                local: sa("127.0.0.1:41668"),
                remote: sa("127.0.0.1:8080"),
                state: TCP_ESTABLISHED,
                inode: 23456,
                v6: false
            }
        ]
    );
}

#[test]
fn stat_handles_spaces_and_parens_in_comm() {
    assert_eq!(
        parse_stat("123 (my (odd) name) S 77 1 1 0"),
        Some(ProcStat {
            comm: "my (odd) name".to_string(),
            ppid: 77,
            flags: None
        })
    );
    assert_eq!(parse_stat("garbage"), None);
    let kworker = parse_stat("5 (kworker/0:1) I 2 0 0 0 -1 69238880 0 0").expect("stat");
    assert_eq!(kworker.flags, Some(69_238_880));
    assert!(kworker.is_kthread(5));
    let user = parse_stat("50 (python3) S 1 0 0 0 -1 4194560 0 0").expect("stat");
    assert!(!user.is_kthread(50));
}

#[test]
fn cgroup_lines() {
    assert_eq!(
        parse_cgroup("0::/user.slice/x.scope\n"),
        Some("/user.slice/x.scope".into())
    );
    assert_eq!(parse_cgroup("1:name=systemd:/x\n"), None);
}

#[test]
fn mapped_libraries_are_found_by_file_name() {
    let maps = "\
7f0000000000-7f0000001000 r--p 00000000 fd:01 1234  /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06
7f0000001000-7f0000002000 r-xp 00001000 fd:01 1234  /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06
7f0000003000-7f0000004000 r-xp 00001000 fd:01 99 /opt/my libs/libcuda.so.1
7f0000005000-7f0000006000 r-xp 00001000 fd:01 77 /usr/lib/libcudart.so.12
7f0000007000-7f0000008000 r-xp 00001000 fd:01 78 /tmp/libcuda.so (deleted)
7f0000009000-7f000000a000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0  [stack]
garbage
";
    let found: Vec<PathBuf> = parse_mapped_files(maps, "libcuda.so").into_iter().collect();
    assert_eq!(
        found,
        vec![
            PathBuf::from("/opt/my libs/libcuda.so.1"),
            PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06"),
        ]
    );
}

#[test]
fn cpu_ticks_of_a_process_and_busy_ticks_of_the_host() {
    let stat = "4242 (python3 (x) y) S 1 4242 4242 0 -1 4194560 2000 0 0 0 150 25 0 0 20 0 9 0";
    assert_eq!(parse_cpu_ticks(stat), Some(175));
    assert_eq!(parse_cpu_ticks("garbage"), None);
    let host = "cpu  100 5 50 1000 30 7 3 2 0 0\ncpu0 50 2 25 500 15 3 1 1 0 0\n";
    // user + nice + system + irq + softirq + steal; not idle, not iowait.
    assert_eq!(parse_busy_ticks(host), Some(167));
}
