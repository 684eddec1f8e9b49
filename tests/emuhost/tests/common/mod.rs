//! Starting and stopping `emuhost serve` for the integration tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!(
            "emuhost-{tag}-{}-{n}-{}",
            std::process::id(),
            tracer_emugpu::monotonic_us()
        ));
        std::fs::create_dir_all(dir.join("dev")).expect("create scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `emuhost serve`.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub scratch: Scratch,
    stopped: bool,
}

impl Server {
    pub fn start(tag: &str, gpus: u32, extra: &[&str]) -> Self {
        let scratch = Scratch::new(tag);
        let d = &scratch.0;
        let mut child = Command::new(env!("CARGO_BIN_EXE_emuhost"))
            .arg("serve")
            .args(["--port", "0", "--gpus", &gpus.to_string()])
            .arg("--state")
            .arg(d.join("state"))
            .arg("--device-root")
            .arg(d.join("dev"))
            .arg("--truth")
            .arg(d.join("truth.jsonl"))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn emuhost serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listening line");
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Self {
            child,
            port,
            scratch,
            stopped: false,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn dir(&self) -> &Path {
        &self.scratch.0
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, wait for a clean exit, return the truth file's lines.
    pub fn stop(&mut self) -> Vec<Value> {
        self.terminate();
        let status = self
            .wait(Duration::from_secs(20))
            .expect("serve did not exit");
        assert!(status.success(), "serve exited with {status}");
        self.stopped = true;
        truth_lines(&self.dir().join("truth.jsonl"))
    }

    fn terminate(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            self.terminate();
            if self.wait(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

pub fn truth_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("truth line is JSON"))
        .collect()
}

/// Content strings of a streamed response's events.
pub fn contents(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            let c = e.get("choices")?.get(0)?;
            c.get("delta")
                .and_then(|d| d.get("content"))
                .or_else(|| c.get("text"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}
