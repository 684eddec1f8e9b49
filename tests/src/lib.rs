//! Harness for tracer's integration tests: root checks, running the real daemon, reading what it
//! saw. The tests themselves live in `it/`.

pub mod client;

use std::{
    ffi::OsStr,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Whether this test may load eBPF. Root: yes. Not root: under `CI=true` that is a failure (CI
/// runs as root, so a skip there would hide a broken setup); elsewhere the test skips, loudly.
pub fn privileged_or_skip(test: &str) -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: CI=true but not running as root: the probes cannot load, refusing to skip"
    );
    eprintln!("SKIPPED {test}: needs root to load eBPF (run `cargo xtask test`, which uses sudo)");
    false
}

/// A TCP port on loopback that nothing listens on now (for a server told its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The daemon under test, running with `--events-out`.
pub struct Tracer {
    child: Option<Child>,
    events: PathBuf,
    log: PathBuf,
}

impl Tracer {
    /// Starts `exe run <args> --events-out <dir>/events.jsonl` and waits until it has attached.
    pub fn start(exe: &str, dir: &Path, args: &[&str]) -> Tracer {
        Self::start_with(exe, dir, args, true)
    }

    /// As [`Tracer::start`]; `events` false leaves out the per-event JSON output (load tests).
    pub fn start_with(exe: &str, dir: &Path, args: &[&str], events: bool) -> Tracer {
        Self::start_env(exe, dir, args, events, &[])
    }

    /// As [`Tracer::start_with`], with extra environment variables.
    pub fn start_env(
        exe: &str,
        dir: &Path,
        args: &[&str],
        events: bool,
        envs: &[(&str, &Path)],
    ) -> Tracer {
        let events_path = dir.join("events.jsonl");
        let log = dir.join("tracer.log");
        let log_file = std::fs::File::create(&log).expect("create log");
        let mut cmd = Command::new(exe);
        cmd.arg("run").args(args);
        // Each daemon its own API socket (the default path is one per host).
        if !args
            .iter()
            .any(|a| *a == "--api-socket" || *a == "--no-api")
        {
            cmd.arg("--api-socket").arg(dir.join("tracer.sock"));
        }
        // And its own store (the default directory is one per host, locked).
        if !args.iter().any(|a| *a == "--store" || *a == "--no-store") {
            cmd.arg("--store").arg(dir.join("store"));
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        if events {
            cmd.arg("--events-out").arg(&events_path);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn tracer");
        let mut t = Tracer {
            child: Some(child),
            events: events_path,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !t.log_text().contains("attached") {
            if let Some(status) = t.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "tracer exited early ({status}) — probes did not load:\n{}",
                    t.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tracer did not attach in 60 s:\n{}",
                t.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    /// `kill -9`: the daemon dies with no chance to finish anything (a crash).
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM, expects a clean exit, and returns every event it wrote.
    pub fn stop(mut self) -> Vec<serde_json::Value> {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "tracer ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log_text();
        assert!(status.success(), "tracer exited with {status}:\n{log}");
        assert!(
            log.contains("probes detached"),
            "no clean detach in log:\n{log}"
        );
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.events) {
            f.read_to_string(&mut text).expect("read events");
        }
        text.lines()
            .map(|l| serde_json::from_str(l).expect("event JSON"))
            .collect()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A binary of another workspace package (`target/<profile>/<name>`, or `deps/` for cdylibs),
/// Starts a server that prints `listening <port>` first; returns it and the port.
pub fn listening(cmd: &mut Command) -> (Child, u16) {
    use std::io::BufRead as _;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server output");
    let port = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected server output {line:?}"));
    (child, port)
}

/// built with cargo first if it is missing.
pub fn workspace_artifact(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    let profile = deps.parent().expect("profile dir").to_path_buf();
    let find = || {
        [profile.join(name), deps.join(name)]
            .into_iter()
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return p;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", package]);
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    find().unwrap_or_else(|| panic!("{name} not found after building {package}"))
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the comm.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `tracer-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tracer-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // KEEP_TEST_DIRS=1 keeps them for a look after a failure.
        if std::env::var_os("KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Events of one kind from one process.
pub fn events_of<'a>(
    events: &'a [serde_json::Value],
    kind: &str,
    tgid: u32,
) -> Vec<&'a serde_json::Value> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["tgid"] == tgid)
        .collect()
}

/// The JSON lines of a file (missing file: none; unparsable lines skipped).
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A running `emuhost serve`; stopped (SIGTERM: it stops its engine and writes the truth) when
/// dropped, so a failing test leaves no emulated server behind.
pub struct EmuHost(Child);

impl EmuHost {
    /// The API process's pid.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Stops the host and waits for it (the truth file is complete afterwards).
    pub fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

impl Drop for EmuHost {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// The files of an emulated-host test: a temp dir with a stand-in device root, a copy of the
/// NVML emulation library as `libnvidia-ml.so.1`, and paths for the sensor state and the truth.
pub struct EmuEnv {
    pub dir: TempDir,
    /// The `emuhost` binary.
    pub emuhost: PathBuf,
    pub dev: PathBuf,
    pub nvml: PathBuf,
    pub state: PathBuf,
    pub truth: PathBuf,
    /// Stand-in CUDA driver library the engine loads (`--cuda-lib`); none by default.
    pub cuda_lib: Option<PathBuf>,
}

impl EmuEnv {
    /// Builds what is missing and lays the files out under a fresh temp dir.
    pub fn new(name: &str) -> EmuEnv {
        let emuhost = workspace_artifact("emuhost", "tracer-emuhost");
        let nvml_built = workspace_artifact("libnvidia_ml.so", "nvml-emu");
        let dir = TempDir::new(name);
        let dev = dir.path().join("dev");
        std::fs::create_dir_all(&dev).expect("dev");
        let nvml = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(&nvml_built, &nvml).expect("copy nvml");
        let state = dir.path().join("state");
        let truth = dir.path().join("truth.jsonl");
        EmuEnv {
            dir,
            emuhost,
            dev,
            nvml,
            state,
            truth,
            cuda_lib: None,
        }
    }

    /// The engine will load `lib` as its CUDA driver (`--cuda-lib`) and call it every step.
    #[must_use]
    pub fn with_cuda_lib(mut self, lib: impl Into<PathBuf>) -> EmuEnv {
        self.cuda_lib = Some(lib.into());
        self
    }

    /// Starts the daemon (`exe run`) on this host's stand-in device nodes and NVML emulation
    /// (`--device-root`, `--standin-devices`, `--nvml-lib`, the sensor state), then `args`, with
    /// `envs` added; no per-event output.
    pub fn start_tracer(&self, exe: &str, args: &[&str], envs: &[(&str, &Path)]) -> Tracer {
        let mut all = vec![
            "--device-root",
            self.dev.to_str().expect("utf8"),
            "--standin-devices",
            "--nvml-lib",
            self.nvml.to_str().expect("utf8"),
        ];
        all.extend_from_slice(args);
        let mut env_all = vec![("TRACER_EMU_STATE", self.state.as_path())];
        env_all.extend_from_slice(envs);
        Tracer::start_env(exe, self.dir.path(), &all, false, &env_all)
    }

    /// Starts the emulated server on `gpus` GPUs.
    pub fn start_host(&self, gpus: u32) -> (EmuHost, u16) {
        self.start_host_with(gpus, &[])
    }

    /// As [`EmuEnv::start_host`], with extra `emuhost serve` arguments (API and engine options,
    /// e.g. `--max-seqs`, `--write-cost-us`).
    pub fn start_host_with(&self, gpus: u32, extra_args: &[&OsStr]) -> (EmuHost, u16) {
        let mut args: Vec<&OsStr> = Vec::new();
        if let Some(lib) = &self.cuda_lib {
            args.push(OsStr::new("--cuda-lib"));
            args.push(lib.as_os_str());
        }
        args.extend_from_slice(extra_args);
        start_emuhost_with(
            &self.emuhost,
            gpus,
            &self.state,
            &self.dev,
            &self.truth,
            &args,
        )
    }
}

/// Starts `emuhost serve` (API process + engine on `gpus` emulated GPUs) and returns it with the
/// port it listens on.
pub fn start_emuhost(
    emuhost: &Path,
    gpus: u32,
    state: &Path,
    dev: &Path,
    truth: &Path,
) -> (EmuHost, u16) {
    start_emuhost_with(emuhost, gpus, state, dev, truth, &[])
}

/// As [`start_emuhost`], with extra `emuhost serve` arguments.
pub fn start_emuhost_with(
    emuhost: &Path,
    gpus: u32,
    state: &Path,
    dev: &Path,
    truth: &Path,
    extra_args: &[&OsStr],
) -> (EmuHost, u16) {
    use std::io::BufRead as _;
    let mut host = Command::new(emuhost)
        .args(["serve", "--port", "0", "--gpus", &gpus.to_string()])
        .arg("--state")
        .arg(state)
        .arg("--device-root")
        .arg(dev)
        .arg("--truth")
        .arg(truth)
        .args(extra_args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn emuhost");
    let mut line = String::new();
    std::io::BufReader::new(host.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("port");
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("emuhost said {line:?}"));
    (EmuHost(host), port)
}

/// A self-signed certificate and its key for `localhost`, made with the `openssl` command
/// (`cargo xtask setup` installs it) in `dir`: (certificate, key) paths.
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(made.success(), "openssl req failed");
    (cert, key)
}

/// `exe replay <recording> --records-out <dir>/replayed.jsonl`: the replayed records' text
/// (panics with the daemon's stderr if the replay fails).
pub fn replay(exe: &str, recording: &Path, dir: &Path) -> String {
    let replayed = dir.join("replayed.jsonl");
    let out = Command::new(exe)
        .arg("replay")
        .arg(recording)
        .arg("--records-out")
        .arg(&replayed)
        .output()
        .expect("run the replay");
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&replayed).expect("replayed records")
}

/// The emulated load generator against `port` (`emuload --port P --fail-on-error` and `args`),
/// each request a JSON line in `out`; returns how many requests it made.
pub fn emuload(port: u16, args: &[&str], out: &Path) -> usize {
    let status = Command::new(workspace_artifact("emuload", "tracer-emuhost"))
        .args(["--port", &port.to_string(), "--fail-on-error"])
        .args(args)
        .arg("--out")
        .arg(out)
        .status()
        .expect("emuload");
    assert!(status.success(), "emuload {args:?}: {status}");
    jsonl(out).len()
}

/// `GET path` on the daemon's API socket (`curl --unix-socket`): the body of a 2xx answer.
pub fn api_get(sock: &Path, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-sf", "--noproxy", "*", "--unix-socket"])
        .arg(sock)
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl");
    assert!(out.status.success(), "GET {path}: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `done` every 50 ms until it holds; after `timeout` fails the test with `what` and
/// `context()` (the daemon's log, say).
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
