//! Fleet aggregation through Prometheus (issue 20): the shipped scrape configuration and rules
//! pass `promtool`, and a real Prometheus (Debian's package) scrapes tracer's metrics listener
//! on loopback during a load, evaluates the shipped recording rules and alerts, and answers
//! for the request-energy series and the rules' outputs over its HTTP API.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer_tests::{EmuEnv, Killed, emuload, free_port, jsonl, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tracer/dist/prometheus")
        .join(name)
}

fn dashboard_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tracer/dist/grafana")
        .join(name)
}

/// Every query of the shipped Grafana dashboard, its variables filled in (all hosts).
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(dashboard_file("tracer-dashboard.json")).expect("dashboard");
    let d: Value = serde_json::from_str(&text).expect("dashboard JSON");
    d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| Some(t["expr"].as_str()?.replace("$instance", ".*")))
        .collect()
}

/// The dashboard against its JSON schema (the subset of Grafana's model it uses), with the
/// `jsonschema` package of the setup's Python environment.
#[test]
fn the_shipped_dashboard_matches_its_schema() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    let check = |dashboard: &str| {
        Command::new(&python)
            .args([
                "-c",
                "import json, sys, jsonschema\n\
                 jsonschema.validate(json.loads(sys.argv[1]), json.load(open(sys.argv[2])))",
                dashboard,
            ])
            .arg(dashboard_file("dashboard.schema.json"))
            .output()
            .expect("target/pyenv (cargo xtask setup makes it)")
    };
    let text = std::fs::read_to_string(dashboard_file("tracer-dashboard.json")).expect("dashboard");
    let out = check(&text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The schema refuses what it should: a panel without queries.
    let mut broken: Value = serde_json::from_str(&text).expect("JSON");
    broken["panels"][0]["targets"] = Value::Array(Vec::new());
    assert!(
        !check(&broken.to_string()).status.success(),
        "an empty panel passed"
    );
}

fn promtool(args: &[&str], file: &Path) {
    let out = Command::new("promtool")
        .args(args)
        .arg(file)
        .output()
        .expect("promtool (cargo xtask setup installs Debian's prometheus)");
    assert!(
        out.status.success(),
        "promtool {args:?} {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_shipped_prometheus_files_pass_promtool() {
    promtool(&["check", "rules"], &shipped("tracer-rules.yml"));
    promtool(
        &["check", "config", "--syntax-only"],
        &shipped("prometheus.yml"),
    );
}

/// Prometheus's HTTP API, through curl: the `data` of a JSON answer.
fn api(port: u16, path: &str, query: Option<&str>) -> Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "--max-time", "10"]);
    if let Some(q) = query {
        cmd.args(["--get", "--data-urlencode"])
            .arg(format!("query={q}"));
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["data"].clone()
}

/// The instant vector's values for `query` (empty until Prometheus has them).
fn values(port: u16, query: &str) -> Vec<f64> {
    api(port, "/api/v1/query", Some(query))["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn prometheus_scrapes_tracer_and_evaluates_the_shipped_rules() {
    if !privileged_or_skip("prometheus_scrapes_tracer_and_evaluates_the_shipped_rules") {
        return;
    }
    let env = EmuEnv::new("prometheus");
    let dir = env.dir.path();
    let (mut host, port) = env.start_host(1);
    let metrics_port = free_port();
    let config = dir.join("tracer.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\nmax_defer_ns = 2000000000\n[api]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
             [bill]\ncurrency = \"EUR\"\nprice_per_kwh = \"0.25\"\n"
        ),
    )
    .expect("config");
    let tracer = env.start_tracer(
        TRACER,
        &[
            "--config",
            config.to_str().expect("utf8"),
            "--port",
            &port.to_string(),
            "--summary-interval-ms",
            "500",
            "--records-out",
            dir.join("records.jsonl").to_str().expect("utf8"),
        ],
        &[],
    );
    // Prometheus: the shipped rules, scraping and evaluating every second.
    let prom_port = free_port();
    let prom_config = dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: tracer\n    static_configs:\n      - targets: [\"127.0.0.1:{metrics_port}\"]\n",
            shipped("tracer-rules.yml").display()
        ),
    )
    .expect("prometheus config");
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
            .spawn()
            .expect("prometheus (cargo xtask setup installs Debian's prometheus)"),
    );
    let load_out = dir.join("load.jsonl");
    let sent = emuload(
        port,
        &[
            "--seconds",
            "8",
            "--concurrency",
            "4",
            "--max-tokens-max",
            "96",
        ],
        &load_out,
    );
    let wanted = [
        "tracer_request_energy_joules_total",
        "tracer:request_watts:rate5m",
        "tracer:request_kwh:increase1h",
        "tracer:request_cost:increase1h",
        "tracer:output_token_joules:ratio_rate5m",
        "tracer:model_kwh:increase1h",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    for q in wanted {
        loop {
            let v = values(prom_port, q);
            if !v.is_empty() && v.iter().all(|x| *x > 0.0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus has no positive {q} after 60 s ({v:?}):\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Nothing is lost or invented on the way: once every request's record is final, what
    // Prometheus scraped is what the records add up to.
    let records = dir.join("records.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while jsonl(&records).len() < sent {
        assert!(
            Instant::now() < deadline,
            "records not final:\n{}",
            tracer.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let recorded: f64 = jsonl(&records)
        .iter()
        .filter_map(|r| r["total_j"].as_f64())
        .sum();
    std::thread::sleep(Duration::from_secs(3));
    let scraped: f64 = values(prom_port, "sum(tracer_request_energy_joules_total)")
        .first()
        .copied()
        .unwrap_or(0.0);
    assert!(
        (scraped - recorded).abs() <= 1e-6 * recorded,
        "Prometheus {scraped} J, records {recorded} J"
    );
    // Every query of the shipped dashboard is valid PromQL over these series.
    for q in dashboard_queries() {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "--get", "--data-urlencode"])
            .arg(format!("query={q}"))
            .arg(format!("http://127.0.0.1:{prom_port}/api/v1/query"))
            .output()
            .expect("curl");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(v["status"], "success", "{q}: {v}");
    }
    // Every rule of the shipped file evaluates without error.
    let rules = api(prom_port, "/api/v1/rules", None);
    let groups = rules["groups"].as_array().expect("rule groups");
    assert_eq!(groups.len(), 2, "{rules}");
    for rule in groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
    {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    drop(tracer);
    host.stop();
}
