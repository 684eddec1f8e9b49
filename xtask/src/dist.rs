//! `cargo xtask dist`: the release tarball an operator installs without any toolchain, and
//! `cargo xtask dist --check`: that tarball unpacked in a clean directory and run from there as
//! an operator would, with no Rust toolchain on `PATH`.
//!
//! The tarball holds `bin/tracer` (the probes are embedded in it), the systemd unit, an example
//! configuration, a README with the requirements, the install steps and every command's
//! `--help`, and `SHA256SUMS`.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{bench::target_dir, sh};

/// Subcommands whose `--help` goes into the README.
const COMMANDS: [&str; 9] = [
    "run", "record", "replay", "services", "sensors", "query", "summary", "top", "report",
];

/// Runs `cmd` and returns its standard output.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The newest `GLIBC_x.y` symbol version `binary` needs (`objdump -T`).
fn glibc_needed(binary: &Path) -> Result<String> {
    let text = output(Command::new("objdump").arg("-T").arg(binary))?;
    let mut best: Option<(u32, u32)> = None;
    for word in text.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        if let Some(v) = word.strip_prefix("GLIBC_") {
            let mut it = v.split('.').map(str::parse::<u32>);
            if let (Some(Ok(major)), Some(Ok(minor))) = (it.next(), it.next()) {
                best = best.max(Some((major, minor)));
            }
        }
    }
    let (major, minor) = best.context("no GLIBC_ symbol versions in the binary")?;
    Ok(format!("{major}.{minor}"))
}

/// The daemon's oldest kernel, as `tracer/src/daemon/host.rs` states it.
fn min_kernel() -> Result<String> {
    let src = fs::read_to_string("tracer/src/daemon/host.rs")?;
    let line = src
        .lines()
        .find(|l| l.contains("pub const MIN_KERNEL"))
        .context("MIN_KERNEL not found in host.rs")?;
    let inside = line
        .split_once("= (")
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(v, _)| v.replace(' ', "").replace(',', "."))
        .context("MIN_KERNEL not understood")?;
    Ok(inside.split('.').take(2).collect::<Vec<_>>().join("."))
}

fn readme(version: &str, glibc: &str, kernel: &str, tracer: &Path) -> Result<String> {
    let mut t = String::new();
    writeln!(
        t,
        "# tracer {version} (x86-64 Linux)\n\n\
         Per-request energy of LLM inference, measured in the kernel. Nothing else to install:\n\
         the eBPF probes are inside `bin/tracer`.\n\n\
         ## Requirements (checked at start, with a message naming what is missing)\n\n\
         - x86-64 Linux {kernel} or later, built with BTF (`/sys/kernel/btf/vmlinux`), as\n  \
           distribution kernels are; tested on 6.18. An older kernel is refused at start.\n\
         - glibc {glibc} or later (the newest symbol version the binary uses: Debian 12, Ubuntu\n  \
           22.04 and later). An older one stops the binary before it runs, with the loader's\n  \
           message naming the missing `GLIBC_` version.\n\
         - root, or the capabilities CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH\n  \
           (and CAP_SYS_ADMIN for the CUDA and OpenSSL uprobes). It keeps only those.\n\
         - For GPUs: the NVIDIA driver (its `libnvidia-ml.so.1`).\n\n\
         ## Install as a systemd service\n\n\
         ```sh\n\
         sha256sum -c SHA256SUMS\n\
         sudo install -m 0755 bin/tracer /usr/local/bin/tracer\n\
         sudo install -m 0644 lib/systemd/system/tracer.service /etc/systemd/system/\n\
         sudo install -D -m 0640 etc/tracer/tracer.toml /etc/tracer/tracer.toml   # edit [targets]\n\
         sudo groupadd --system tracer            # readers of the API socket\n\
         sudo systemctl daemon-reload && sudo systemctl enable --now tracer\n\
         systemctl status tracer                  # \"tracing N processes\" once attached\n\
         sudo systemctl reload tracer             # config re-read, targets re-resolved\n\
         tracer summary --by model                # as a member of the tracer group\n\
         ```\n\n\
         Or run it by hand: `sudo bin/tracer run --port 8000`.\n"
    )?;
    writeln!(t, "## Commands\n")?;
    let help = |args: &[&str]| output(Command::new(tracer).args(args).env("NO_COLOR", "1"));
    writeln!(t, "```text\n{}```\n", help(&["--help"])?)?;
    for c in COMMANDS {
        writeln!(
            t,
            "### tracer {c}\n\n```text\n{}```\n",
            help(&[c, "--help"])?
        )?;
    }
    Ok(t)
}

/// Builds the tarball; returns its path.
pub fn dist() -> Result<PathBuf> {
    let built = crate::build_release()?;
    let version = output(Command::new(&built).arg("--version"))?
        .trim()
        .trim_start_matches("tracer ")
        .to_owned();
    let name = format!("tracer-{version}-x86_64-linux-gnu");
    let out = target_dir().join("dist");
    let root = out.join(&name);
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "lib/systemd/system", "etc/tracer"] {
        fs::create_dir_all(root.join(d))?;
    }
    let bin = root.join("bin/tracer");
    fs::copy(&built, &bin)?;
    sh(Command::new("strip").arg(&bin))?;
    fs::copy(
        "tracer/dist/tracer.service",
        root.join("lib/systemd/system/tracer.service"),
    )?;
    fs::copy(
        "tracer/dist/tracer.toml",
        root.join("etc/tracer/tracer.toml"),
    )?;
    let (glibc, kernel) = (glibc_needed(&bin)?, min_kernel()?);
    fs::write(
        root.join("README.md"),
        readme(&version, &glibc, &kernel, &bin)?,
    )?;
    let files = [
        "bin/tracer",
        "lib/systemd/system/tracer.service",
        "etc/tracer/tracer.toml",
        "README.md",
    ];
    let sums = output(Command::new("sha256sum").args(files).current_dir(&root))?;
    fs::write(root.join("SHA256SUMS"), sums)?;
    let tarball = out.join(format!("{name}.tar.gz"));
    sh(Command::new("tar")
        .arg("czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&out)
        .arg(&name))?;
    let size = fs::metadata(&tarball)?.len();
    eprintln!(
        "dist: {} ({:.1} MiB); needs Linux >= {kernel}, glibc >= {glibc}",
        tarball.display(),
        size as f64 / 1_048_576.0
    );
    Ok(tarball)
}

/// A free TCP port on loopback.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One plain HTTP/1.1 GET; returns the status line.
fn get(port: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply.lines().next().unwrap_or_default().to_owned())
}

/// A clean environment with no Rust toolchain: the PATH a fresh host's root has.
const PLAIN_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Unpacks `tarball` in a clean directory and runs it from there as an operator would: the
/// checksums, the unit through `systemd-analyze verify`, and the daemon (no toolchain on
/// `PATH`) attached to a test server, producing one record per request.
pub fn check(tarball: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tracer-dist-check-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    sh(Command::new("tar")
        .arg("xzf")
        .arg(tarball)
        .arg("-C")
        .arg(&dir))?;
    let root = fs::read_dir(&dir)?.next().context("empty tarball")??.path();
    sh(Command::new("sha256sum")
        .args(["--check", "--quiet", "SHA256SUMS"])
        .current_dir(&root))?;
    let bin = root.join("bin/tracer");
    let toolchain = Command::new("sh")
        .args(["-c", "command -v cargo rustc"])
        .env_clear()
        .env("PATH", PLAIN_PATH)
        .output()?;
    if toolchain.status.success() {
        bail!(
            "a Rust toolchain is on the plain PATH ({}): the check would prove nothing",
            String::from_utf8_lossy(&toolchain.stdout).trim()
        );
    }

    // The unit, pointed at the unpacked binary and configuration.
    let unit_dir = dir.join("unit");
    fs::create_dir_all(&unit_dir)?;
    let unit = fs::read_to_string(root.join("lib/systemd/system/tracer.service"))?
        .replace("/usr/local/bin/tracer", &bin.display().to_string())
        .replace(
            "/etc/tracer/tracer.toml",
            &root.join("etc/tracer/tracer.toml").display().to_string(),
        );
    fs::write(unit_dir.join("tracer.service"), unit)?;
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit_dir.join("tracer.service"))
        .output()
        .context("systemd-analyze (Debian's systemd package)")?;
    let said = String::from_utf8_lossy(&verify.stderr).into_owned();
    if !verify.status.success() || said.contains("tracer.service:") {
        bail!("systemd-analyze verify: {said}");
    }
    eprintln!("dist check: checksums and systemd-analyze verify passed");

    // The daemon, from the unpacked tree, against a test server.
    let port = free_port()?;
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("python3 -m http.server")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = server.kill();
            bail!("the test server did not listen");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let records = dir.join("records.jsonl");
    let log = dir.join("tracer.log");
    let mut daemon = crate::privileged(&bin.display().to_string())
        .args(["run", "--port", &port.to_string(), "--no-store", "--no-api"])
        .args(["--summary-interval-ms", "0", "--records-out"])
        .arg(&records)
        .env_clear()
        .env("PATH", PLAIN_PATH)
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    let result = (|| -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !fs::read_to_string(&log)?.contains("attached") {
            if let Some(status) = daemon.try_wait()? {
                bail!("tracer exited ({status}):\n{}", fs::read_to_string(&log)?);
            }
            if Instant::now() > deadline {
                bail!("tracer did not attach:\n{}", fs::read_to_string(&log)?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let n = 5;
        for _ in 0..n {
            let status = get(port)?;
            if !status.contains(" 200 ") {
                bail!("the test server answered {status:?}");
            }
        }
        Ok(n)
    })();
    let _ = crate::privileged("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let status = daemon.wait()?;
    let _ = server.kill();
    let _ = server.wait();
    let sent = result?;
    let text = fs::read_to_string(&log)?;
    if !status.success() || !text.contains("probes detached") {
        bail!("tracer did not stop cleanly ({status}):\n{text}");
    }
    let got = fs::read_to_string(&records)?.lines().count();
    if got != sent {
        bail!("{sent} requests sent, {got} records:\n{text}");
    }
    eprintln!(
        "dist check: the unpacked tracer (PATH={PLAIN_PATH}, no toolchain) attached to a test \
         server and wrote {got} records for {sent} requests"
    );
    let _ = fs::remove_dir_all(&dir);
    deployments()
}

/// The container image's build script (its Dockerfile's builder stage runs exactly it; no
/// container daemon here) and the Kubernetes manifest against the API's `OpenAPI` schemas.
fn deployments() -> Result<()> {
    let out = target_dir().join("container-out");
    sh(Command::new("bash")
        .arg("tracer/dist/container/build.sh")
        .arg(&out))?;
    let dockerfile = fs::read_to_string("tracer/dist/container/Dockerfile")?;
    if !dockerfile.contains("RUN tracer/dist/container/build.sh /out") {
        bail!(
            "the Dockerfile's builder stage no longer runs build.sh: the image would be built by untested steps"
        );
    }
    sh(
        Command::new(crate::setup::pyenv_bin("kubernetes-validate")).args([
            "--strict",
            "--quiet",
            "tracer/dist/kubernetes/tracer.yaml",
        ]),
    )?;
    eprintln!(
        "dist check: the image's build script built a working binary; the manifest validates (kubernetes-validate --strict)"
    );
    Ok(())
}
