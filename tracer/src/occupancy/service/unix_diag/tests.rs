use super::*;

fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(data);
    while b.len() % 4 != 0 {
        b.push(0);
    }
    b
}

fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&2u16.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(payload);
    while b.len() % 4 != 0 {
        b.push(0);
    }
    b
}

fn diag_msg(kind: u8, state: u8, inode: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![libc::AF_UNIX as u8, kind, state, 0];
    b.extend_from_slice(&inode.to_ne_bytes());
    b.extend_from_slice(&[0u8; 8]);
    for a in attrs {
        b.extend_from_slice(a);
    }
    b
}

#[test]
fn request_layout() {
    let r = request();
    assert_eq!(r.len(), 40);
    assert_eq!(u32_at(&r, 0), Some(40));
    assert_eq!(u16_at(&r, 4), Some(20));
    assert_eq!(r[16], libc::AF_UNIX as u8);
    assert_eq!(u32_at(&r, 20), Some(u32::MAX));
    assert_eq!(u32_at(&r, 28), Some(5));
}

#[test]
fn batch_with_names_peers_done_and_errors() {
    let mut buf = message(
        SOCK_DIAG_BY_FAMILY,
        SEQ,
        &diag_msg(
            SOCK_STREAM,
            1,
            100,
            &[
                attr(UNIX_DIAG_NAME, b"/tmp/sock"),
                attr(UNIX_DIAG_PEER, &101u32.to_ne_bytes()),
            ],
        ),
    );
    buf.extend(message(
        SOCK_DIAG_BY_FAMILY,
        SEQ,
        &diag_msg(SOCK_DGRAM, 7, 102, &[attr(UNIX_DIAG_NAME, b"\0abstract")]),
    ));
    // Another request's message is skipped.
    buf.extend(message(
        SOCK_DIAG_BY_FAMILY,
        SEQ + 1,
        &diag_msg(SOCK_STREAM, 1, 999, &[]),
    ));
    let mut out = Vec::new();
    assert!(!parse_batch(&buf, &mut out).expect("parses"));
    assert_eq!(
        out,
        vec![
            UnixSocket {
                inode: 100,
                kind: SOCK_STREAM,
                state: 1,
                peer: Some(101),
                name: Some("/tmp/sock".into())
            },
            UnixSocket {
                inode: 102,
                kind: SOCK_DGRAM,
                state: 7,
                peer: None,
                name: Some("@abstract".into())
            }
        ]
    );
    assert!(parse_batch(&message(NLMSG_DONE, SEQ, &0i32.to_ne_bytes()), &mut out).expect("done"));
    let err = parse_batch(
        &message(NLMSG_ERROR, SEQ, &(-13i32).to_ne_bytes()),
        &mut out,
    );
    assert!(
        matches!(&err, Err(DiagError::Kernel(e)) if e.raw_os_error() == Some(13)),
        "{err:?}"
    );
}

#[test]
fn malformed_lengths_are_errors_not_panics() {
    let good = message(SOCK_DIAG_BY_FAMILY, SEQ, &diag_msg(SOCK_STREAM, 1, 5, &[]));
    let mut out = Vec::new();
    // nlmsg_len past the buffer.
    let mut long = good.clone();
    long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
    assert!(matches!(
        parse_batch(&long, &mut out),
        Err(DiagError::Malformed(_))
    ));
    // nlmsg_len below the header.
    let mut short = good.clone();
    short[0..4].copy_from_slice(&4u32.to_ne_bytes());
    assert!(parse_batch(&short, &mut out).is_err());
    // Payload shorter than unix_diag_msg.
    assert!(parse_batch(&message(SOCK_DIAG_BY_FAMILY, SEQ, &[1, 2, 3]), &mut out).is_err());
    // Attribute longer than the payload.
    let mut bad_attr = diag_msg(SOCK_STREAM, 1, 5, &[attr(UNIX_DIAG_PEER, &[0; 4])]);
    bad_attr[16..18].copy_from_slice(&200u16.to_ne_bytes());
    assert!(parse_message(&bad_attr).is_err());
    // Truncated peer attribute.
    assert!(parse_message(&diag_msg(SOCK_STREAM, 1, 5, &[attr(UNIX_DIAG_PEER, &[1])])).is_err());
    // Trailing bytes shorter than a header are ignored.
    let mut tail = good;
    tail.extend_from_slice(&[0; 8]);
    assert!(!parse_batch(&tail, &mut out).expect("parses"));
    assert!(
        proptest_like_fuzz(),
        "random buffers never panic the parser"
    );
}

/// Feeds pseudo-random buffers (deterministic xorshift) to the parser.
fn proptest_like_fuzz() -> bool {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..2000 {
        let mut buf = vec![0u8; (x % 200) as usize];
        for b in &mut buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if buf.len() >= 16 {
            buf[8..12].copy_from_slice(&SEQ.to_ne_bytes());
            buf[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        }
        let _ = parse_batch(&buf, &mut Vec::new());
    }
    true
}

#[test]
fn kernel_dump_finds_a_socketpair() {
    use std::os::unix::{fs::MetadataExt as _, net::UnixStream};
    let (a, b) = UnixStream::pair().expect("socketpair");
    let ino = |s: &UnixStream| {
        std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
            .expect("stat fd")
            .ino()
    };
    let (ia, ib) = (ino(&a), ino(&b));
    let all = dump().expect("sock_diag dump");
    let sa = all.iter().find(|s| s.inode == ia).expect("a listed");
    assert_eq!(sa.peer, Some(ib));
    assert_eq!(sa.kind, SOCK_STREAM);
    assert!(sa.name.is_none());
}
