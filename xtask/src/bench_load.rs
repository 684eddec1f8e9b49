//! `cargo xtask bench`: what tracer costs a provider, measured in one run with every case
//! alternated (with and without tracer, the order flipped each round) so the VM's drift falls
//! on both sides: saturated throughput and p99 latency for an axum and a uvicorn server,
//! non-streamed and streamed (SSE at a realistic token rate); the daemon's CPU per request and
//! per SSE event (all its threads, from the first request until the last record is final, the
//! default configuration: store, journal and API on); its RSS with 1k and 10k connections open;
//! then the host-wide tax (`bench-probes`) and the power sampler (`bench-sampler`).
//!
//! `--quick` (CI) runs each case once with small counts as a correctness check: no timing is
//! asserted, but a request the daemon did not record fails it. Its records are final within
//! 2 s (`ledger.max_defer_ns`); the full run keeps the default and warms the daemon up first.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::privileged;

/// One load generator run, as `loadgen` prints it.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    ok: u64,
    failed: u64,
    rps: f64,
    p99_ms: f64,
    events: u64,
}

/// One traced run: the load, the daemon's CPU over it, what it recorded.
#[derive(Debug, Clone, Copy, Default)]
struct Traced {
    load: Load,
    cpu_s: f64,
    recorded: u64,
}

/// A request mix.
#[derive(Debug, Clone, Copy)]
struct Mix {
    name: &'static str,
    stream: bool,
    max_tokens: u64,
    token_delay_ms: u64,
    conns: u64,
    requests: u64,
}

fn mixes(quick: bool) -> [Mix; 2] {
    let scale = if quick { 20 } else { 1 };
    [
        Mix {
            name: "no-op, not streamed",
            stream: false,
            max_tokens: 4,
            token_delay_ms: 0,
            conns: 32,
            requests: 20_000 / scale,
        },
        Mix {
            // 64 tokens at 50 tokens/s per stream, 128 streams at once: ~6,400 events/s.
            name: "LLM-shaped SSE (64 tokens at 50/s)",
            stream: true,
            max_tokens: 64,
            token_delay_ms: 20,
            conns: 128,
            requests: 3_000 / scale,
        },
    ]
}

fn spawn_listening(cmd: &mut Command) -> Result<(Child, u16)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let port = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("{cmd:?} said {line:?}"))?;
    Ok((child, port))
}

/// The daemon, attached to `port` with the default configuration (its store and socket in
/// `dir`, kept from one start to the next: what it learned is restored, as on a real host).
struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Daemon {
    fn start(tracer: &Path, port: u16, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("tracer.toml");
        if !config.exists() {
            std::fs::write(&config, "")?;
        }
        let log = dir.join("tracer.log");
        let sock = dir.join("tracer.sock");
        let child = privileged(&tracer.to_string_lossy())
            .args(["run", "--port", &port.to_string()])
            .arg("--store")
            .arg(dir.join("store"))
            .arg("--api-socket")
            .arg(&sock)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting tracer")?;
        // Attached, and its API answering: the socket is bound just after the "attached"
        // line, so a query right after that line could find no socket yet.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("attached"))
            || std::os::unix::net::UnixStream::connect(&sock).is_err()
        {
            if Instant::now() > deadline {
                bail!("tracer did not attach: {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, sock })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Requests the daemon has made final records of.
    fn recorded(&self) -> Result<u64> {
        let v = get(&self.sock, "/v1/summary?by=service")?;
        Ok(v["groups"]
            .as_array()
            .map_or(0, |g| g.iter().filter_map(|g| g["requests"].as_u64()).sum()))
    }

    /// Waits until `n` records are final (or 70 s pass: a cold cost model defers records up
    /// to `ledger.max_defer_ns`); returns how many are.
    fn wait_recorded(&self, n: u64) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(70);
        loop {
            let got = self.recorded()?;
            if got >= n || Instant::now() > deadline {
                return Ok(got);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stopped however the bench ends (an error included): detached, its records flushed.
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = privileged("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A child killed however the bench ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on the daemon's socket.
fn get(sock: &Path, path: &str) -> Result<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to {}", sock.display()))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: tracer\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).with_context(|| format!("{path}: {out}"))
}

/// A process's CPU time, all threads (those that ended included), in seconds.
fn cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15: 11 and 12 after the command.
    Ok((ticks(11) + ticks(12)) / 100.0)
}

/// A process's resident set, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0))
}

fn run_load(loadgen: &Path, port: u16, m: &Mix, requests: u64) -> Result<Load> {
    let out = Command::new(loadgen)
        .args(["--port", &port.to_string()])
        .args(["--conns", &m.conns.to_string()])
        .args(["--requests", &requests.to_string()])
        .args(["--max-tokens", &m.max_tokens.to_string()])
        .args(["--token-delay-ms", &m.token_delay_ms.to_string()])
        .args(m.stream.then_some("--stream"))
        .output()
        .context("running loadgen")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(Load {
        ok: v["ok"].as_u64().unwrap_or(0),
        failed: v["failed"].as_u64().unwrap_or(0),
        rps: f("rps"),
        p99_ms: f("p99_ms"),
        events: v["events"].as_u64().unwrap_or(0),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    crate::stats::median_in_place(&mut v)
}

/// One row of the table: a server and a mix, alternated with and without tracer.
struct Row {
    server: &'static str,
    mix: Mix,
    off: Vec<Load>,
    on: Vec<Traced>,
}

impl Row {
    fn print(&self) {
        let rps_off = median(self.off.iter().map(|l| l.rps).collect());
        let rps_on = median(self.on.iter().map(|t| t.load.rps).collect());
        let p99_off = median(self.off.iter().map(|l| l.p99_ms).collect());
        let p99_on = median(self.on.iter().map(|t| t.load.p99_ms).collect());
        let per_req = median(
            self.on
                .iter()
                .map(|t| t.cpu_s * 1e6 / t.load.ok.max(1) as f64)
                .collect(),
        );
        let per_event = if self.mix.stream {
            format!(
                "{:.2}",
                median(
                    self.on
                        .iter()
                        .map(|t| t.cpu_s * 1e6 / t.load.events.max(1) as f64)
                        .collect()
                )
            )
        } else {
            "-".into()
        };
        let lost: u64 = self
            .on
            .iter()
            .map(|t| t.load.ok.saturating_sub(t.recorded))
            .sum();
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.3} | {:.2} | {:.2} | {:.1} | {per_event} | {lost} |",
            self.server,
            self.mix.name,
            rps_off,
            rps_on,
            rps_on / rps_off,
            p99_off,
            p99_on,
            per_req,
        );
    }
}

/// `exe` with as many descriptors as 10k connections need.
fn unlimited(exe: &str) -> Command {
    let mut c = Command::new("sh");
    c.args([
        "-c",
        "ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec \"$0\" \"$@\"",
        exe,
    ]);
    c
}

/// Daemon RSS with `n` keep-alive connections open to the traced server (each served once).
fn rss_with_connections(
    loadgen: &Path,
    tracer: &Path,
    port: u16,
    dir: &Path,
    n: u64,
    extra_config: &str,
) -> Result<u64> {
    // A fresh store: what it holds per connection, not the API's memory of the records the
    // earlier cases stored (it loads up to `api.memory_records` of them at start). Records
    // final within 2 s while the fresh cost model is cold.
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("tracer.toml"),
        format!("{extra_config}\n[ledger]\nmax_defer_ns = 2000000000\n"),
    )?;
    let d = Daemon::start(tracer, port, dir)?;
    let before = d.recorded()?;
    let mut hold = Killed(
        unlimited(&loadgen.to_string_lossy())
            .args(["--port", &port.to_string(), "--hold", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut line = String::new();
    BufReader::new(hold.0.stdout.take().context("stdout")?).read_line(&mut line)?;
    if !line.starts_with("held") {
        bail!("loadgen --hold said {line:?}");
    }
    let got = d.wait_recorded(before + n)? - before;
    if got < n {
        bail!("with {n} connections held the daemon recorded {got} requests");
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(d.pid())?;
    let stdin: Option<ChildStdin> = hold.0.stdin.take();
    drop(stdin);
    let _ = hold.0.wait();
    drop(d);
    Ok(rss)
}

/// The daemon, the axum server and the load generator, release.
fn build_load_bins() -> Result<()> {
    crate::bench::build_release(&["tracer"], &["openai-axum", "loadgen"])
}

/// `cargo xtask bench-rss`: the daemon's RSS attached to the axum server, idle and with 1k
/// and 10k connections, `extra` appended to its configuration.
pub fn bench_rss(extra: Option<&Path>) -> Result<()> {
    if !crate::is_root() {
        bail!("cargo xtask bench-rss reads the daemon's memory in /proc: run it as root");
    }
    let extra = extra
        .map(std::fs::read_to_string)
        .transpose()?
        .unwrap_or_default();
    build_load_bins()?;
    let release = crate::bench::target_dir().join("release");
    let (tracer, loadgen) = (release.join("tracer"), release.join("loadgen"));
    let dir = std::env::temp_dir().join(format!("tracer-xbench-rss-{}", std::process::id()));
    let (server, port) = spawn_listening(&mut unlimited(
        &release.join("openai-axum").to_string_lossy(),
    ))?;
    let _server = Killed(server);
    println!("| open connections (axum, traced, each served once) | daemon RSS, MiB |");
    println!("|---|---|");
    for n in [0, 1_000, 10_000] {
        let kib = if n == 0 {
            let d = Daemon::start(&tracer, port, &dir.join("rss-0"))?;
            std::thread::sleep(Duration::from_secs(2));
            rss_kib(d.pid())?
        } else {
            rss_with_connections(
                &loadgen,
                &tracer,
                port,
                &dir.join(format!("rss-{n}")),
                n,
                &extra,
            )?
        };
        println!("| {n} | {:.1} |", kib as f64 / 1024.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

pub fn bench(quick: bool) -> Result<()> {
    if !crate::is_root() {
        // Under sudo the pid at hand would be sudo's, and its CPU and memory near zero.
        bail!("cargo xtask bench reads the daemon's CPU and memory in /proc: run it as root");
    }
    build_load_bins()?;
    let release = crate::bench::target_dir().join("release");
    let (tracer, loadgen) = (release.join("tracer"), release.join("loadgen"));
    let dir = std::env::temp_dir().join(format!("tracer-xbench-{}", std::process::id()));
    let rounds = if quick { 1 } else { 3 };
    // 10k connections need as many descriptors in the server and the generator.
    let pyenv = PathBuf::from("target/pyenv/bin/python");
    let mut servers: Vec<(&'static str, Command)> = vec![(
        "axum",
        unlimited(&release.join("openai-axum").to_string_lossy()),
    )];
    if pyenv.exists() {
        let mut c = Command::new(&pyenv);
        c.arg("tests/servers/openai_uvicorn.py");
        servers.push(("uvicorn", c));
    } else if std::env::var("CI").as_deref() == Ok("true") {
        bail!(
            "{} missing: `cargo xtask setup` installs uvicorn",
            pyenv.display()
        );
    } else {
        eprintln!(
            "SKIPPED uvicorn: {} missing (cargo xtask setup)",
            pyenv.display()
        );
    }
    let mut rows = Vec::new();
    let mut rss = Vec::new();
    for (name, mut cmd) in servers {
        let (server, port) = spawn_listening(&mut cmd)?;
        let server = Killed(server);
        for m in mixes(quick) {
            // Warm the server up, and the daemon: its cost model learns the service (the store
            // keeps it for the next start, as after a restart on a real host).
            run_load(&loadgen, port, &m, m.requests / 10)?;
            let daemon_dir = dir.join(format!("{name}-{}", m.max_tokens));
            if quick {
                // A correctness check: records final within 2 s even while the cost model is
                // cold (the default waits up to a minute for it).
                std::fs::create_dir_all(&daemon_dir)?;
                std::fs::write(
                    daemon_dir.join("tracer.toml"),
                    "[ledger]\nmax_defer_ns = 2000000000\n",
                )?;
            }
            let d = Daemon::start(&tracer, port, &daemon_dir)?;
            let warm = run_load(&loadgen, port, &m, m.requests / 4)?;
            d.wait_recorded(warm.ok)?;
            drop(d);
            let mut row = Row {
                server: name,
                mix: m,
                off: Vec::new(),
                on: Vec::new(),
            };
            for r in 0..rounds {
                for traced in if r % 2 == 0 {
                    [false, true]
                } else {
                    [true, false]
                } {
                    if !traced {
                        row.off.push(run_load(&loadgen, port, &m, m.requests)?);
                        continue;
                    }
                    let d = Daemon::start(&tracer, port, &daemon_dir)?;
                    let before = d.recorded()?;
                    let cpu0 = cpu_s(d.pid())?;
                    let load = run_load(&loadgen, port, &m, m.requests)?;
                    let recorded = d.wait_recorded(before + load.ok)? - before;
                    let cpu = cpu_s(d.pid())? - cpu0;
                    drop(d);
                    if load.failed > 0 {
                        bail!("{name}, {}: {} requests failed", m.name, load.failed);
                    }
                    if recorded != load.ok {
                        bail!(
                            "{name}, {}: the clients had {} answers, the daemon {} records",
                            m.name,
                            load.ok,
                            recorded
                        );
                    }
                    row.on.push(Traced {
                        load,
                        cpu_s: cpu,
                        recorded,
                    });
                }
            }
            row.print();
            rows.push(row);
        }
        if name == "axum" {
            for n in if quick {
                vec![1_000]
            } else {
                vec![1_000, 10_000]
            } {
                rss.push((
                    n,
                    rss_with_connections(
                        &loadgen,
                        &tracer,
                        port,
                        &dir.join(format!("rss-{n}")),
                        n,
                        "",
                    )?,
                ));
            }
        }
        drop(server);
    }
    println!();
    println!(
        "| server | mix | req/s without | req/s with | ratio | p99 ms without | p99 ms with | daemon CPU µs/request | µs/SSE event | lost |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        r.print();
    }
    println!();
    println!("| open connections | daemon RSS, MiB |");
    println!("|---|---|");
    for (n, kib) in &rss {
        println!("| {n} | {:.1} |", *kib as f64 / 1024.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !quick {
        println!();
        crate::bench::bench_probes(&crate::bench::ProbesBench {
            iterations: 200_000,
            rounds: 1,
            baseline: None,
        })?;
        println!();
        for gpus in [1, 8] {
            crate::bench::bench_sampler(gpus, 100, 10, "none")?;
        }
        // The same sampler with the driver's per-call CPU (the H200's), at the daemon's
        // default 50 Hz: what 1 and 8 real GPUs cost.
        for gpus in [1, 8] {
            crate::bench::bench_sampler(gpus, 50, 10, "h200")?;
        }
    }
    Ok(())
}
