#!/bin/bash
# Builds the release `tracer` (probes embedded) into OUT_DIR, stripped. The container image's
# builder stage runs exactly this (Dockerfile beside it), and CI runs it too
# (`cargo xtask dist --check`), so the image is built by steps that are tested.
#   tracer/dist/container/build.sh OUT_DIR        (from the repository root)
set -euo pipefail
OUT=${1:?usage: build.sh OUT_DIR}
# The toolchains the probes need (LLVM 22, the pinned nightly, bpf-linker); idempotent.
cargo xtask setup
cargo build --release --locked -p tracer --bin tracer
mkdir -p "$OUT"
cp target/release/tracer "$OUT/tracer"
strip "$OUT/tracer"
"$OUT/tracer" --version
