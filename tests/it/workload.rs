//! Workload identity end to end (issue 20): a server in a cgroup laid out as a kubelet's
//! systemd driver lays out a containerd container, a fake kubelet `/pods` endpoint on loopback,
//! and the daemon: the pod UID and container id come from the cgroup path at once, the names
//! once the kubelet answers (it is down at start, as after a node reboot), and then every
//! record, the services view, summaries by service and the per-service metrics carry them.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;
use tracer_tests::{
    Killed, TempDir, Tracer, api_get, client::Client, free_port, listening, privileged_or_skip,
    wait_until,
};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");
const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/servers/openai_stdlib.py");

const UID: &str = "4f9c3a1e-7b2d-4c8e-9a01-23456789abcd";
const CONTAINER: &str = "5e3c0ffee0123456789abcdef0123456789abcdef0123456789abcdef0123456";
const TOKEN: &str = "test-token-1234";

/// The kubelet's `/pods` answer for the pod (only the fields tracer reads, and some it skips).
fn pod_list() -> String {
    format!(
        r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{}},"items":[
          {{"metadata":{{"name":"other","namespace":"kube-system","uid":"00000000-0000-0000-0000-000000000001"}},
            "status":{{"containerStatuses":[{{"name":"x","containerID":"containerd://{}"}}]}}}},
          {{"metadata":{{"name":"vllm-0","namespace":"llm","uid":"{UID}","labels":{{"app":"vllm"}}}},
            "spec":{{"containers":[{{"name":"engine","image":"vllm/vllm-openai"}}]}},
            "status":{{"phase":"Running","containerStatuses":[
              {{"name":"engine","containerID":"containerd://{CONTAINER}","ready":true}}]}}}}]}}"#,
        "1".repeat(64)
    )
}

/// A kubelet's pods endpoint: answers `GET /pods` with [`pod_list`] and keeps each request's
/// first line and `Authorization` header.
fn fake_kubelet(port: u16) -> Arc<Mutex<Vec<(String, String)>>> {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("the kubelet's port");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(&conn);
            let (mut first, mut auth) = (String::new(), String::new());
            let _ = reader.read_line(&mut first);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("authorization")
                {
                    auth = v.trim().to_string();
                }
            }
            let body = if first.starts_with("GET /pods ") {
                pod_list()
            } else {
                String::new()
            };
            let status = if body.is_empty() {
                "404 Not Found"
            } else {
                "200 OK"
            };
            let _ = (&conn).write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            log.lock()
                .expect("log")
                .push((first.trim().to_string(), auth));
        }
    });
    seen
}

fn json(sock: &Path, path: &str) -> Value {
    let body = api_get(sock, path);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Polls `f` for up to 30 s.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let mut got = None;
    wait_until(
        what,
        Duration::from_secs(30),
        || {
            got = f();
            got.is_some()
        },
        String::new,
    );
    got.expect("waited for")
}

fn post(port: u16, rid: &str) {
    let mut c = Client::connect(port).expect("connect");
    let body = r#"{"model":"m","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#;
    let ex = c
        .post(
            "/v1/chat/completions",
            body,
            &[("X-Request-Id", rid), ("X-Tenant", "acme")],
        )
        .expect("exchange");
    assert_eq!(ex.status, 200);
}

/// The container's cgroup (and the slices above it, deepest last), made under the v2 root.
fn kubepods_cgroup() -> Vec<PathBuf> {
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists())
        .expect("a cgroup v2 hierarchy");
    let pod = format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_"));
    let mut dirs = Vec::new();
    let mut at = root;
    for part in [
        "kubepods.slice",
        "kubepods-burstable.slice",
        &pod,
        &format!("cri-containerd-{CONTAINER}.scope"),
    ] {
        at = at.join(part);
        std::fs::create_dir_all(&at).expect("create a cgroup");
        dirs.push(at.clone());
    }
    dirs
}

#[test]
fn records_services_summaries_and_metrics_name_the_pod_once_the_kubelet_answers() {
    if !privileged_or_skip(
        "records_services_summaries_and_metrics_name_the_pod_once_the_kubelet_answers",
    ) {
        return;
    }
    let dir = TempDir::new("workload");
    let cgroups = kubepods_cgroup();
    let leaf = cgroups.last().expect("the container's cgroup").clone();
    let (server, port) = listening(Command::new("sh").args([
        "-c",
        &format!(
            "echo $$ > {}/cgroup.procs && exec python3 {SERVER}",
            leaf.display()
        ),
    ]));
    let server = Killed(server);

    let kubelet_port = free_port();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).expect("token");
    let config = dir.path().join("tracer.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\nmax_defer_ns = 2000000000\n[http]\ntenant_header = \"x-tenant\"\n\
             [probe]\nrediscover_ms = 300\nrediscover_max_ms = 600\n\
             [workload]\nkubelet_url = \"http://127.0.0.1:${{TEST_KUBELET_PORT}}\"\n\
             kubelet_token_file = \"{}\"\nkubelet_refresh_ms = 200\nkubelet_timeout_ms = 500\n",
            dir.path().join("token").display()
        ),
    )
    .expect("config");
    let config_s = config.to_str().expect("utf-8");
    let port_s = port.to_string();
    let kubelet_port_s = kubelet_port.to_string();
    let tracer = Tracer::start_env(
        TRACER,
        dir.path(),
        &["--config", config_s, "--port", &port_s],
        false,
        &[("TEST_KUBELET_PORT", Path::new(&kubelet_port_s))],
    );
    let sock = dir.path().join("tracer.sock");

    // The kubelet is down: the cgroup path alone gives the pod UID and container id.
    post(port, "before");
    let w = wait_for("the services view", || {
        let s = json(&sock, "/v1/services");
        let w = s["services"][0]["workload"].clone();
        (!w.is_null()).then_some(w)
    });
    assert_eq!(w["pod_uid"], UID, "{w:#}");
    assert_eq!(w["container_id"], CONTAINER);
    assert_eq!(w["runtime"], "containerd");
    assert!(w.get("pod").is_none(), "no names without the kubelet: {w}");
    let first = wait_for("the first record", || {
        json(&sock, "/v1/requests?limit=10")["requests"]
            .as_array()
            .and_then(|l| l.first().cloned())
    });
    assert_eq!(first["workload"]["pod_uid"], UID, "{first:#}");
    assert!(first["workload"].get("namespace").is_none());

    // It comes up: a re-discovery names the pod (the token sent as a bearer).
    let seen = fake_kubelet(kubelet_port);
    let named = wait_for("the pod's names", || {
        let s = json(&sock, "/v1/services");
        let w = s["services"][0]["workload"].clone();
        (w["pod"] == "vllm-0").then_some(w)
    });
    assert_eq!(named["namespace"], "llm");
    assert_eq!(named["container"], "engine");
    assert_eq!(named["pod_uid"], UID);
    {
        let seen = seen.lock().expect("log");
        assert!(!seen.is_empty());
        for (line, auth) in seen.iter() {
            assert!(line.starts_with("GET /pods HTTP/1.1"), "{line}");
            assert_eq!(auth, &format!("Bearer {TOKEN}"));
        }
    }

    for i in 0..3 {
        post(port, &format!("after-{i}"));
    }
    let records = wait_for("four records", || {
        let l = json(&sock, "/v1/requests?limit=10")["requests"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (l.len() >= 4).then_some(l)
    });
    let named_records = records
        .iter()
        .filter(|r| r["workload"]["pod"] == "vllm-0")
        .count();
    assert_eq!(
        named_records, 3,
        "the requests after the kubelet answered: {records:#?}"
    );
    for r in &records {
        assert_eq!(r["workload"]["container_id"], CONTAINER, "{r:#}");
    }
    let summary = json(&sock, "/v1/summary?by=service");
    assert_eq!(
        summary["groups"][0]["workload"]["pod"], "vllm-0",
        "{summary:#}"
    );
    let metrics = api_get(&sock, "/metrics");
    let service = format!("service=\"port {port}\",model=\"m\"");
    assert!(
        metrics.contains(&format!(
            "tracer_requests_total{{{service},namespace=\"llm\",pod=\"vllm-0\",container=\"engine\"}} 3"
        )),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l.starts_with(&format!(
            "tracer_tenant_requests_total{{{service},namespace=\"llm\",pod=\"vllm-0\",container=\"engine\",tenant="
        )) && l.ends_with(" 3")),
        "{metrics}"
    );
    let table = Command::new(TRACER)
        .args(["summary", "--by", "service", "--socket"])
        .arg(&sock)
        .output()
        .expect("tracer summary");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("  in llm/vllm-0/engine"), "{table}");
    // The one before the names: its own series, without pod labels.
    assert!(
        metrics.contains(&format!("tracer_requests_total{{{service}}} 1")),
        "{metrics}"
    );
    assert!(
        tracer.log_text().contains("runs in llm/vllm-0/engine"),
        "{}",
        tracer.log_text()
    );
    tracer.stop();
    drop(server);
    for d in cgroups.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}
