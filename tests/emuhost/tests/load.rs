//! `emuload` against `emuhost serve`.

mod common;

use std::process::Command;

use serde_json::Value;

use common::Server;

#[test]
fn emuload_runs_without_errors() {
    let mut server = Server::start("load", 2, &[]);
    let out = server.dir().join("load.jsonl");
    let result = Command::new(env!("CARGO_BIN_EXE_emuload"))
        .args(["--port", &server.port.to_string()])
        .args(["--seconds", "3", "--concurrency", "4", "--seed", "7"])
        .args(["--max-tokens-max", "96", "--fail-on-error"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run emuload");
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(stdout.contains("requests"), "{stdout}");
    let records: Vec<Value> = std::fs::read_to_string(&out)
        .expect("out file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    assert!(records.len() >= 4, "{}", records.len());
    for r in &records {
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["status"], 200);
        assert!(
            r["request_id"]
                .as_str()
                .is_some_and(|s| s.starts_with("load-"))
        );
    }
    let truth = server.stop();
    let reqs: Vec<&Value> = truth
        .iter()
        .filter(|l| l.get("summary").is_none())
        .collect();
    assert_eq!(reqs.len(), records.len());
    for r in &records {
        assert!(
            reqs.iter().any(|t| t["request_id"] == r["request_id"]),
            "{r}"
        );
    }
}
