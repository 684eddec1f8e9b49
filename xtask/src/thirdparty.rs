//! `cargo xtask thirdparty`: the third-party check at scale (`tests/it/thirdparty.rs`), with
//! llama.cpp's C++ `llama-server` built from source (the llama.cpp tree vendored in the
//! `llama-cpp-python` source distribution on the Python package index, pinned) and a generated
//! tiny model.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{privileged, root_runner, sh, succeeds};

/// The `llama-cpp-python` source distribution whose `vendor/llama.cpp` is built.
const LLAMA_CPP_PYTHON: &str = "0.3.36";
const DIR: &str = "target/llama.cpp";
/// `setup`'s Python environment (`numpy` and `pyyaml` go in for the model writer).
const PYTHON: &str = "target/pyenv/bin/python";

/// Downloads and unpacks the llama.cpp sources, unless they are there.
fn sources(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("src");
    if src.join("CMakeLists.txt").exists() {
        eprintln!("thirdparty: llama.cpp sources present");
        return Ok(src);
    }
    std::fs::create_dir_all(&src)?;
    let tarball = dir.join("llama-cpp-python.tar.gz");
    // The project's JSON (its file URLs may be relative to it, as on a mirror).
    let fetch = format!(
        "import json, urllib.parse as p, urllib.request as u\n\
         base = 'https://pypi.org/pypi/llama-cpp-python/json'\n\
         d = json.load(u.urlopen(base))\n\
         files = d['releases']['{LLAMA_CPP_PYTHON}']\n\
         url = [f['url'] for f in files if f['packagetype'] == 'sdist'][0]\n\
         u.urlretrieve(p.urljoin(base, url), '{}')",
        tarball.display()
    );
    sh(Command::new("python3").args(["-c", &fetch]))?;
    sh(Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .args([
            "--strip-components=3",
            &format!("llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"),
        ]))?;
    Ok(src)
}

/// Builds `llama-server` (CPU only, portable) unless it is built.
fn server(src: &Path) -> Result<PathBuf> {
    let build = src.join("build");
    let bin = build.join("bin/llama-server");
    if bin.exists() {
        eprintln!("thirdparty: {} present", bin.display());
        return Ok(bin);
    }
    if !succeeds("cmake", &["--version"]) {
        sh(privileged("apt-get").args(["install", "-y", "--no-install-recommends", "cmake"]))?;
    }
    sh(Command::new("cmake")
        .arg("-S")
        .arg(src)
        .arg("-B")
        .arg(&build)
        .args([
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=OFF",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
        ]))?;
    let jobs = std::thread::available_parallelism().map_or(2, usize::from);
    sh(Command::new("cmake").arg("--build").arg(&build).args([
        "--target",
        "llama-server",
        "-j",
        &jobs.to_string(),
    ]))?;
    Ok(bin)
}

/// Writes the tiny model with the sources' own `gguf-py`.
fn model(src: &Path, dir: &Path) -> Result<PathBuf> {
    let gguf = dir.join("tiny.gguf");
    // What gguf-py imports.
    let ready = Command::new(PYTHON)
        .args(["-c", "import numpy, yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        sh(Command::new(PYTHON).args(["-m", "pip", "install", "--quiet", "numpy", "pyyaml"]))?;
    }
    sh(Command::new(PYTHON)
        .arg("tests/llama/tiny_gguf.py")
        .arg(src.join("gguf-py"))
        .arg(&gguf))?;
    Ok(gguf)
}

/// Builds what the check needs, then runs it: `requests` per server at `concurrency`.
pub fn thirdparty(requests: u64, concurrency: u64) -> Result<()> {
    let dir = PathBuf::from(DIR);
    let src = sources(&dir).context("llama.cpp sources")?;
    let bin = server(&src).context("building llama-server")?;
    let gguf = model(&src, &dir).context("the tiny model")?;
    let mut cmd = Command::new("cargo");
    cmd.args([
        "test",
        "--release",
        "-p",
        "tracer-tests",
        "--test",
        "thirdparty",
    ])
    .args([
        "--",
        "--nocapture",
        "--test-threads",
        "1",
        "--include-ignored",
    ])
    .env("TRACER_THIRDPARTY_REQUESTS", requests.to_string())
    .env("TRACER_THIRDPARTY_CONCURRENCY", concurrency.to_string())
    .env("TRACER_LLAMA_SERVER", std::fs::canonicalize(&bin)?)
    .env("TRACER_LLAMA_MODEL", std::fs::canonicalize(&gguf)?);
    root_runner(&mut cmd);
    sh(&mut cmd)
}
