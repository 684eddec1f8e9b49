//! Builds the eBPF object (`tracer-probes`) with the pinned nightly and bpf-linker.
//!
//! `cargo xtask setup` installs both. The nightly is pinned because its LLVM must match the
//! LLVM that bpf-linker was built against (22); see the README.

/// The nightly that compiles the probes (LLVM 22, like Debian's llvm-22-dev).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("tracer-ebpf"))
        .ok_or_else(|| anyhow::anyhow!("no workspace root above tracer/"))?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("workspace path is not UTF-8"))?;
    println!("cargo:rerun-if-env-changed=TRACER_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("TRACER_EBPF_TOOLCHAIN").unwrap_or_else(|_| EBPF_TOOLCHAIN.into());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
