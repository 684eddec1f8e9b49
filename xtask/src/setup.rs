//! `cargo xtask setup`: install what a fresh machine lacks to build and load the probes. Every
//! step first checks whether it is needed and says what it found or did.

use std::{env, path::Path, process::Command};

use anyhow::Result;

use crate::{cargo_bin_dir, privileged, sh, succeeds};

/// The nightly that compiles the eBPF crate: its LLVM (22) must match bpf-linker's (Debian's
/// llvm-22-dev). Never a floating `nightly`: newer ones ship LLVM 23. Keep in sync with
/// tracer/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
/// Debian package providing the LLVM that bpf-linker links against.
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TRACEFS: &str = "/sys/kernel/tracing";
/// The Python environment (relative to the workspace root) the third-party check runs uvicorn
/// from; `tests/it/thirdparty.rs` expects it there.
const PYENV: &str = "target/pyenv";
const UVICORN: &str = "0.55.0";
/// Validates the Kubernetes manifest against the API's `OpenAPI` schemas, offline.
const KUBERNETES_VALIDATE: &str = "1.37.0";

/// A program installed in the setup's Python environment.
pub fn pyenv_bin(name: &str) -> std::path::PathBuf {
    Path::new(PYENV).join("bin").join(name)
}

pub fn setup() -> Result<()> {
    // 1. LLVM 22 development files for bpf-linker.
    if Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        eprintln!("setup: {LLVM_PACKAGE} present");
    } else {
        eprintln!("setup: installing {LLVM_PACKAGE} (apt)");
        sh(privileged("apt-get").arg("update"))?;
        sh(privileged("apt-get")
            .args(["install", "-y", "--no-install-recommends", LLVM_PACKAGE])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    // 1b. Node.js: the tests trace Node's own `http` server (its writev-ended streams); the
    // openssl command makes the HTTPS test's self-signed certificate;
    // promtool (Debian's prometheus) checks the API's /metrics text; systemd-analyze the unit.
    for (tool, package) in [
        ("node", "nodejs"),
        ("openssl", "openssl"),
        ("promtool", "prometheus"),
        // `cargo xtask dist --check` verifies the systemd unit offline.
        ("systemd-analyze", "systemd"),
    ] {
        if succeeds(tool, &["version"]) || succeeds(tool, &["--version"]) {
            eprintln!("setup: {package} present");
        } else {
            eprintln!("setup: installing {package} (apt)");
            sh(privileged("apt-get").arg("update"))?;
            sh(privileged("apt-get")
                .args(["install", "-y", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
    }

    // 2. The pinned nightly with rust-src (build-std) and clippy (eBPF lints).
    let have_nightly = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    match have_nightly {
        Some(list) if list.contains("rust-src") && list.contains("clippy") => {
            eprintln!("setup: {EBPF_TOOLCHAIN} with rust-src and clippy present");
        }
        _ => {
            eprintln!("setup: installing {EBPF_TOOLCHAIN} with rust-src, clippy");
            sh(Command::new("rustup").args([
                "toolchain",
                "install",
                EBPF_TOOLCHAIN,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
                "--component",
                "clippy",
            ]))?;
        }
    }

    // 3. Stable components used by `test`.
    for (component, probe) in [("clippy", "clippy-driver"), ("rustfmt", "rustfmt")] {
        if succeeds(probe, &["--version"]) {
            eprintln!("setup: {component} present");
        } else {
            eprintln!("setup: installing {component}");
            sh(Command::new("rustup").args(["component", "add", component]))?;
        }
    }

    // 4. bpf-linker, built against LLVM 22.
    let linker = cargo_bin_dir().join("bpf-linker");
    if succeeds("bpf-linker", &["--version"]) || linker.exists() {
        eprintln!("setup: bpf-linker present");
    } else {
        eprintln!("setup: building bpf-linker against LLVM 22 (about 2 minutes)");
        let path = format!("{LLVM_PREFIX}/bin:{}", env::var("PATH").unwrap_or_default());
        sh(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }

    // 5. A Python environment with uvicorn, for the third-party check's uvicorn server, and
    // kubernetes-validate (the Kubernetes OpenAPI schemas, offline) for the shipped manifest.
    let python = Path::new(PYENV).join("bin/python");
    let has_both = python.exists()
        && Command::new(&python)
            .args(["-c", "import uvicorn, kubernetes_validate"])
            .status()
            .is_ok_and(|s| s.success());
    if has_both {
        eprintln!("setup: {PYENV} has uvicorn and kubernetes-validate");
    } else {
        eprintln!(
            "setup: {PYENV} with uvicorn {UVICORN} and kubernetes-validate {KUBERNETES_VALIDATE} (pip)"
        );
        if !python.exists() {
            sh(Command::new("python3").args(["-m", "venv", PYENV]))?;
        }
        sh(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("uvicorn=={UVICORN}"),
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE}"),
        ]))?;
    }

    // 6. tracefs (the daemon also mounts it itself if needed).
    if Path::new(TRACEFS).join("events").is_dir() {
        eprintln!("setup: tracefs mounted");
    } else {
        eprintln!("setup: mounting tracefs at {TRACEFS}");
        if let Err(e) = sh(privileged("mount").args(["-t", "tracefs", "nodev", TRACEFS])) {
            eprintln!("setup: could not mount tracefs ({e}); the daemon will try again as root");
        }
    }
    Ok(())
}
