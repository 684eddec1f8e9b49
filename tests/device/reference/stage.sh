#!/bin/bash
# Stages what the reference run carries to a GPU host, from the repository root:
#   bash tests/device/reference/stage.sh
# the release `tracer` (probes embedded), stripped, at .devbin/tracer, and the serving wheels of
# wheels.txt at .whl/ for CPython $PYVER (default 3.12, the lent H200's; a dry run here passes
# the local Python's version). Both folders are git-ignored: name them in the device call's carry.
set -eu
PYVER=${PYVER:-3.12}
# The same build the container image uses (release, probes embedded, stripped).
bash tracer/dist/container/build.sh .devbin
rm -rf .whl
mkdir -p .whl
grep -v '^#' tests/device/reference/wheels.txt | xargs python3 -m pip download -q --no-deps \
  --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl
ls -l .devbin/tracer .whl
du -sh .devbin .whl
