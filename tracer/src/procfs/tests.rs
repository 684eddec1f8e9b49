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
