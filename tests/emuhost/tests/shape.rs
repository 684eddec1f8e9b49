//! Process shape: the API process never touches the devices; the engine holds them open.

mod common;

use std::path::PathBuf;

use tracer_emugpu::SensorReader;
use tracer_emuhost::client::Conn;

use common::Server;

fn fd_targets(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect()
}

fn ppid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').expect("comm").1;
    after
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("ppid")
}

#[test]
fn api_and_engine_processes() {
    let gpus = 3;
    let mut server = Server::start("shape", gpus, &[]);
    let mut c = Conn::connect(server.addr()).expect("connect");
    let health = c.get("/health").expect("health").json().expect("json");
    let api_pid = server.pid();
    assert_eq!(health["api_pid"].as_u64(), Some(u64::from(api_pid)));
    let engine_pid =
        u32::try_from(health["engine_pid"].as_u64().expect("engine pid")).expect("pid");
    assert_ne!(engine_pid, api_pid);
    assert_eq!(ppid(engine_pid), api_pid);

    let root = server.dir().join("dev");
    let state = server.dir().join("state");
    let api_fds = fd_targets(api_pid);
    assert!(
        !api_fds.iter().any(|p| p.starts_with(&root) || *p == state),
        "API process holds {api_fds:?}"
    );
    let engine_fds = fd_targets(engine_pid);
    let mut want = vec![root.join("nvidiactl"), root.join("nvidia-uvm")];
    want.extend((0..gpus).map(|i| root.join(format!("nvidia{i}"))));
    for w in &want {
        assert!(engine_fds.contains(w), "engine lacks {w:?}: {engine_fds:?}");
    }

    // The engine registered itself as the compute process on every GPU.
    let reader = SensorReader::open(&state).expect("state");
    assert_eq!(reader.count(), gpus as usize);
    for g in 0..gpus as usize {
        let snap = reader.snapshot(g).expect("snapshot");
        assert_eq!(
            snap.processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
            vec![engine_pid]
        );
    }
    drop(c);

    let truth = server.stop();
    assert_eq!(truth.last().expect("summary")["summary"], true);
    // The engine is gone too.
    assert!(
        !PathBuf::from(format!("/proc/{engine_pid}/fd")).exists() || ppid(engine_pid) != api_pid
    );
}
