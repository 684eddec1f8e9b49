//! What a user meets when something is wrong: the cause named once, before anything else
//! fails for a reason that hides it; no colour codes where nobody reads colour.

use std::process::{Command, Output};

use tracer_tests::{TempDir, privileged_or_skip};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer-under-test");

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A failed run: its stderr, checked for what every error message must be.
fn failed(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tracer");
    assert!(!out.status.success(), "expected a failure");
    let text = stderr(&out);
    assert!(!text.contains('\u{1b}'), "colour codes in a pipe: {text:?}");
    text
}

#[test]
fn without_privileges_the_privilege_is_named_first() {
    if !privileged_or_skip("without_privileges_the_privilege_is_named_first") {
        return;
    }
    let text = failed(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(TRACER)
            .args(["run", "--port", "1"]),
    );
    assert_eq!(text.matches("tracer needs root").count(), 1, "{text}");
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "uid 65534"] {
        assert!(text.contains(cap), "{cap} not named: {text}");
    }
    assert!(!text.contains("no process listens"), "{text}");
}

#[test]
fn invalid_values_are_refused_and_each_cause_told_once() {
    if !privileged_or_skip("invalid_values_are_refused_and_each_cause_told_once") {
        return;
    }
    let text = failed(Command::new(TRACER).args([
        "run",
        "--no-store",
        "--port",
        "1",
        "--capture-bytes",
        "0",
    ]));
    assert_eq!(text.matches("probe.capture_bytes = 0").count(), 1, "{text}");

    let dir = TempDir::new("cli-errors");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[probe]\nbogus_key = 1\n").expect("write config");
    let text = failed(Command::new(TRACER).args(["run", "--config"]).arg(&bad));
    assert_eq!(
        text.matches("unknown field `bogus_key`").count(),
        1,
        "{text}"
    );
    assert!(text.contains(&bad.display().to_string()), "{text}");

    // An output that cannot be created: its path named, the OS error once.
    let mut target = Command::new("sleep").arg("30").spawn().expect("sleep");
    let out = dir.path().join("missing-dir").join("records.jsonl");
    let text = failed(
        Command::new(TRACER)
            .args([
                "run",
                "--no-store",
                "--pid",
                &target.id().to_string(),
                "--records-out",
            ])
            .arg(&out),
    );
    let _ = target.kill();
    let _ = target.wait();
    assert!(text.contains(&out.display().to_string()), "{text}");
    assert_eq!(
        text.matches("No such file or directory").count(),
        1,
        "{text}"
    );
}
