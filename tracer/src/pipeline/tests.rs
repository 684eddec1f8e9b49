use tracer_ebpf::abi::{self, GpuEvent, Header, Kind, ProcEvent};

use super::*;
use crate::{ids::ServiceId, ledger::DeviceKind};

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: plain #[repr(C)] records, read as bytes the way the ring buffer hands them.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

fn header(kind: Kind, tgid: u32, ts_ns: u64) -> Header {
    Header {
        ts_ns,
        tgid,
        tid: tgid,
        kind: kind as u16,
        flags: 0,
        pad: 0,
    }
}

fn gpu(tgid: u32, ts_ns: u64, what: u32, dev: u32, uuid: [u8; 16]) -> Input {
    Input::Probe {
        bytes: bytes_of(&GpuEvent {
            hdr: header(Kind::Gpu, tgid, ts_ns),
            ioctls: 1,
            what,
            dev,
            contexts: 1,
            class: 0xCBC0,
            uuid,
        }),
    }
}

fn proc_event(kind: Kind, tgid: u32, ts_ns: u64, pid: u32, ppid: u32) -> Input {
    Input::Probe {
        bytes: bytes_of(&ProcEvent {
            hdr: header(kind, tgid, ts_ns),
            pid,
            ppid,
            comm: [0; 16],
        }),
    }
}

const UUID1: [u8; 16] = [
    0xe3, 0xa0, 0, 1, 0x7a, 0xce, 0x4e, 1, 0x80, 1, 0, 0, 0xe1, 0x1a, 0, 1,
];

fn pipeline() -> Pipeline {
    let mut p = Pipeline::new(&PipelineConfig::default(), Bus::new()).expect("new");
    for (i, uuid) in [
        "GPU-e3a00000-7ace-4e00-8000-0000e11a0000",
        "GPU-e3a00001-7ace-4e01-8001-0000e11a0001",
    ]
    .iter()
    .enumerate()
    {
        p.apply(Input::Device {
            id: DeviceId(i as u32),
            setup: DeviceSetup {
                name: format!("gpu{i}"),
                kind: DeviceKind::Gpu,
                estimated: false,
                idle_watts: Some(70.0),
                counter_period_ns: Some(100_000_000),
                minor: Some(i as u32),
                uuid: Some((*uuid).into()),
            },
        });
    }
    for (id, name, pid) in [(0, "api", 10), (1, "other", 20)] {
        p.apply(Input::Service {
            id: ServiceId(id),
            name: name.into(),
            ts_ns: 0,
            workload: None,
        });
        p.apply(Input::Member {
            pid: Pid(pid),
            service: ServiceId(id),
            reason: "target".into(),
        });
    }
    p
}

fn gpus_of(p: &Pipeline, service: u32) -> Vec<String> {
    p.services()
        .into_iter()
        .find(|s| s.id == ServiceId(service))
        .map(|s| s.gpus.into_iter().map(|g| g.device).collect())
        .unwrap_or_default()
}

#[test]
fn contexts_and_uvm_bind_and_release() {
    let mut p = pipeline();
    p.apply(gpu(10, 1, abi::GPU_FIRST_USE, 0, [0; 16]));
    assert!(
        gpus_of(&p, 0).is_empty(),
        "opening a node is not holding the GPU"
    );
    p.apply(gpu(10, 2, abi::GPU_CONTEXT_UP, 0, [0; 16]));
    p.apply(gpu(10, 3, abi::GPU_UVM_REGISTER, 0, UUID1));
    assert_eq!(gpus_of(&p, 0), vec!["gpu0", "gpu1"]);
    p.apply(gpu(10, 4, abi::GPU_CONTEXT_DOWN, 0, [0; 16]));
    assert_eq!(gpus_of(&p, 0), vec!["gpu1"]);
    p.apply(gpu(10, 5, abi::GPU_UVM_UNREGISTER, 0, UUID1));
    assert!(gpus_of(&p, 0).is_empty());
    // An RM client freed takes its contexts with it.
    p.apply(gpu(10, 6, abi::GPU_CONTEXT_UP, 1, [0; 16]));
    assert_eq!(gpus_of(&p, 0), vec!["gpu1"]);
    p.apply(gpu(10, 7, abi::GPU_CLIENT_FREED, 0xC1D0_0000, [0; 16]));
    assert!(gpus_of(&p, 0).is_empty());
    // Unknown GPUs are counted, not guessed.
    p.apply(gpu(10, 8, abi::GPU_CONTEXT_UP, 7, [0; 16]));
    assert_eq!(p.counts().gpu_unknown_device, 1);
}

#[test]
fn children_inherit_the_service_and_exits_release() {
    let mut p = pipeline();
    p.apply(proc_event(Kind::ProcFork, 10, 1, 11, 10));
    p.apply(gpu(11, 2, abi::GPU_CONTEXT_UP, 0, [0; 16]));
    assert_eq!(
        gpus_of(&p, 0),
        vec!["gpu0"],
        "the engine's GPU is the API's service's"
    );
    let view = p.services();
    assert_eq!(
        view[0].members.get(&Pid(11)).map(String::as_str),
        Some("descendant of 10")
    );
    p.apply(proc_event(Kind::ProcExit, 11, 3, 11, 0));
    assert!(gpus_of(&p, 0).is_empty(), "a dead engine holds nothing");
    assert!(!p.services()[0].members.contains_key(&Pid(11)));
    assert_eq!(p.take_exited(), vec![11]);
}

#[test]
fn thread_exits_forget_what_thread_creation_added() {
    let mut p = pipeline();
    for tid in 100..110 {
        p.apply(proc_event(Kind::ProcFork, 10, 1, tid, 10));
    }
    assert_eq!(p.services()[0].members.len(), 11);
    for tid in 100..110 {
        let mut ev = ProcEvent {
            hdr: header(Kind::ProcExit, 10, 2),
            pid: tid,
            ppid: 0,
            comm: [0; 16],
        };
        ev.hdr.tid = tid;
        ev.hdr.flags = abi::EXIT_FLAG_THREAD;
        p.apply(Input::Probe {
            bytes: bytes_of(&ev),
        });
    }
    let view = p.services();
    assert_eq!(
        view[0].members.keys().copied().collect::<Vec<_>>(),
        vec![Pid(10)]
    );
    assert!(
        p.take_exited().is_empty(),
        "a thread's end is not a process's"
    );
    assert_eq!(
        p.binding.tracked_processes(),
        2,
        "only the two targets are left"
    );
}

#[test]
fn shared_gpu_is_weighted_by_sm_utilisation() {
    let mut p = pipeline();
    p.apply(gpu(10, 1, abi::GPU_CONTEXT_UP, 0, [0; 16]));
    p.apply(Input::SeedGpu {
        pid: Pid(20),
        minor: 0,
        ts_ns: 1,
        evidence: "open device node".into(),
    });
    let weights = |p: &Pipeline| -> Vec<Option<f64>> {
        p.services()
            .iter()
            .map(|s| s.gpus.first().and_then(|g| g.weight))
            .collect()
    };
    assert_eq!(weights(&p), vec![None, None], "no samples: equal split");
    p.apply(Input::Power {
        readings: vec![Reading::ProcessUtil {
            device: 0,
            ts_ns: 2,
            pid: 10,
            sm_percent: 80,
            window_ns: 1_000_000_000,
        }],
    });
    // The other service ran nothing in the window: NVML has no sample for it.
    assert_eq!(weights(&p), vec![Some(80.0), Some(0.0)]);
    // Samples go stale: back to the equal split.
    p.apply(Input::Power {
        readings: vec![Reading::ProcessUtil {
            device: 0,
            ts_ns: 10_000_000_000,
            pid: 99,
            sm_percent: 5,
            window_ns: 1_000_000_000,
        }],
    });
    assert_eq!(weights(&p), vec![Some(0.0), Some(0.0)]);
}

#[test]
fn nvml_process_lists_bind_only_traced_processes() {
    let mut p = pipeline();
    p.apply(Input::Power {
        readings: vec![Reading::Processes {
            device: 1,
            ts_ns: 1,
            pids: vec![20, 555],
        }],
    });
    assert_eq!(gpus_of(&p, 1), vec!["gpu1"]);
    assert!(gpus_of(&p, 0).is_empty());
    p.apply(Input::Power {
        readings: vec![Reading::Processes {
            device: 1,
            ts_ns: 2,
            pids: vec![555],
        }],
    });
    assert!(gpus_of(&p, 1).is_empty(), "gone from the list: released");
}

/// A read of `total` bytes on connection 5 of tgid 10, captured from `offset` in one record.
fn data(ts_ns: u64, flags: u16, total: u64, offset: u32, payload: &[u8]) -> Input {
    let head = abi::DataHead {
        hdr: Header {
            flags,
            ..header(Kind::Data, 10, ts_ns)
        },
        conn_id: 5,
        total_len: total,
        fd: 7,
        cap_len: payload.len() as u32,
        syscall: abi::Syscall::Read as u8,
        pad1: 0,
        iov_segs: 0,
        offset,
    };
    let mut bytes = bytes_of(&head);
    bytes.extend_from_slice(payload);
    Input::Probe { bytes }
}

#[test]
fn a_read_captured_in_pieces_is_put_back_together_and_a_lost_piece_is_counted() {
    let mut p = pipeline();
    p.apply(Input::Probe {
        bytes: bytes_of(&abi::ConnEvent {
            hdr: header(Kind::Conn, 10, 1),
            conn_id: 5,
            fd: 7,
            listen_fd: 3,
            family: libc::AF_INET as u16,
            port: 8000,
            syscall: abi::Syscall::Accept4 as u8,
            pad: [0; 3],
            addr: [0; 16],
        }),
    });
    // A 6,000-byte head (a long cookie) in one read: 4,096 bytes, then the rest.
    let head = format!(
        "GET /v1/models HTTP/1.1\r\nCookie: {}\r\n\r\n",
        "c".repeat(6000 - 37)
    );
    let b = head.as_bytes();
    assert_eq!(b.len(), 6000);
    let (more, cont) = (abi::DATA_FLAG_MORE, abi::DATA_FLAG_CONT);
    p.apply(data(10, more, 6000, 0, &b[..4096]));
    p.apply(data(10, cont, 6000, 4096, &b[4096..]));
    assert_eq!(p.counts().http.requests, 1);
    assert_eq!(p.counts().data_pieces_lost, 0);
    // The same again, but the ring lost the middle piece: counted, and the head not invented.
    p.apply(data(20, more, 9000, 0, &b[..4096]));
    p.apply(data(20, cont, 9000, 8192, &b[..808]));
    assert_eq!(p.counts().data_pieces_lost, 1);
    assert_eq!(p.counts().http.requests, 1);
}
