use super::*;

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: reading the plain-data representation of a #[repr(C)] value.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

fn header(kind: Kind, flags: u16) -> Header {
    Header {
        ts_ns: 42,
        tgid: 7,
        tid: 8,
        kind: kind as u16,
        flags,
        pad: 0,
    }
}

#[test]
fn data_record_round_trips_with_payload() {
    let head = DataHead {
        hdr: header(Kind::Data, 0),
        conn_id: 99,
        total_len: 10_000,
        fd: 5,
        cap_len: 4,
        syscall: Syscall::Writev as u8,
        pad1: 0,
        iov_segs: 3,
        offset: 0,
    };
    let mut bytes = bytes_of(&head);
    bytes.extend_from_slice(b"HTTP");
    let ev = decode(&bytes).expect("decodes");
    assert_eq!((ev.ts_ns, ev.tgid, ev.tid), (42, 7, 8));
    match ev.body {
        Body::Data {
            conn_id,
            total_len,
            inbound,
            payload,
            iov_segs,
            syscall,
            ..
        } => {
            assert_eq!(conn_id, 99);
            assert_eq!(total_len, 10_000);
            assert!(!inbound);
            assert_eq!(payload, b"HTTP");
            assert_eq!(iov_segs, 3);
            assert_eq!(syscall, Syscall::Writev);
        }
        other => panic!("wrong body {other:?}"),
    }
}

#[test]
fn truncated_payload_is_an_error_not_a_panic() {
    let head = DataHead {
        hdr: header(Kind::Data, 0),
        conn_id: 1,
        total_len: 100,
        fd: 5,
        cap_len: 100,
        syscall: Syscall::Read as u8,
        pad1: 0,
        iov_segs: 0,
        offset: 0,
    };
    let mut bytes = bytes_of(&head);
    bytes.extend_from_slice(&[b'x'; 10]);
    assert!(matches!(decode(&bytes), Err(DecodeError::Short { .. })));
}

#[test]
fn garbage_is_rejected() {
    assert!(matches!(decode(&[1, 2, 3]), Err(DecodeError::Short { .. })));
    let mut hdr = header(Kind::Conn, 0);
    hdr.kind = 777;
    assert_eq!(
        decode(&bytes_of(&hdr)).err(),
        Some(DecodeError::UnknownKind(777))
    );
    // A header alone is too short for a conn record.
    assert!(matches!(
        decode(&bytes_of(&header(Kind::Conn, 0))),
        Err(DecodeError::Short { kind: "conn", .. })
    ));
}

#[test]
fn ipc_data_record_has_no_payload() {
    let head = DataHead {
        hdr: header(Kind::Data, DATA_FLAG_IPC),
        conn_id: 5,
        total_len: 300,
        fd: 11,
        cap_len: 0,
        syscall: Syscall::Recvmsg as u8,
        pad1: 0,
        iov_segs: 0,
        offset: 0,
    };
    let bytes = bytes_of(&head);
    let ev = decode(&bytes).expect("decodes");
    match ev.body {
        Body::Data {
            ipc,
            payload,
            inbound,
            total_len,
            ..
        } => {
            assert!(ipc);
            assert!(payload.is_empty());
            assert!(inbound);
            assert_eq!(total_len, 300);
        }
        other => panic!("wrong body {other:?}"),
    }
}

#[test]
fn cuda_sync_record_decodes_and_renders() {
    let ev = CudaSyncEvent {
        hdr: header(Kind::CudaSync, 0),
        launches: 12,
        graph_launches: 1,
        sync: abi::CUDA_SYNC_EVENT,
        pad: [0; 7],
    };
    let bytes = bytes_of(&ev);
    let ev = decode(&bytes).expect("decodes");
    assert_eq!(ev.body.kind(), Kind::CudaSync);
    let json = serde_json::to_value(&ev).expect("json");
    assert_eq!(json["kind"], "cuda_sync");
    assert_eq!(json["launches"], 12);
    assert_eq!(json["graph_launches"], 1);
    assert_eq!(json["sync"], "event");
    let mut bad = bytes.clone();
    bad[40 - 8] = 9;
    assert_eq!(decode(&bad).err(), Some(DecodeError::UnknownCudaSync(9)));
    assert!(matches!(
        decode(&bytes[..30]),
        Err(DecodeError::Short {
            kind: "cuda_sync",
            ..
        })
    ));
}

#[test]
fn conn_record_decodes_peer() {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    let ev = ConnEvent {
        hdr: header(Kind::Conn, 0),
        conn_id: 3,
        fd: 9,
        listen_fd: 4,
        family: 2,
        port: 5555,
        syscall: Syscall::Accept4 as u8,
        pad: [0; 3],
        addr,
    };
    let bytes = bytes_of(&ev);
    let ev = decode(&bytes).expect("decodes");
    match ev.body {
        Body::Conn {
            peer, listen_fd, ..
        } => {
            assert_eq!(peer, Some("127.0.0.1:5555".parse().expect("addr")));
            assert_eq!(listen_fd, Some(4));
        }
        other => panic!("wrong body {other:?}"),
    }
}
