#!/bin/bash
# The physical reference (issue 18): a third-party continuous-batching server on the GPU, loaded
# in timed periods, its energy counter read by an independent process, tracer attached.
# From the repository root, after tests/device/reference/stage.sh (carry .devbin and .whl):
#   bash tests/device/reference.sh                      on the GPU host: smoke pass, then full run
#   DRY=1 PY=/path/to/python bash tests/device/reference.sh   dry run here, on the CPU
# Writes $OUT/reference.tgz (the load log, the counter log, tracer's records, their replays, the
# recording, the logs) and $OUT/reference.log; `cargo xtask reference DIR` makes the tables.
#
# Two `transformers serve --continuous-batching` servers (S1, S2) run the same locally built
# Llama-3.2-1B-shaped model. Class A is decode-heavy, class B prefill-heavy (load.py).
#   tput-pre     tokens/s on S1 before tracer is attached
#   smoke        one repetition of the four periods, short (aborts if tracer misses requests)
#   main         3 x {idle, A, B, A+B} on S1: the two-class Shapley split
#   seq          one request at a time on S1: each request against its own counter window
#   svc          3 x {idle, S1 (class A), S2 (class B), both}: two services sharing the GPU
#   tput-with    tokens/s on S1 with tracer attached; tput-post after it is stopped
set -u
OUT=${OUT:-/tmp/reference-out}
W=${W:-/tmp/reference}
PY=${PY:-python3}
DRY=${DRY:-0}
T=$PWD/.devbin/tracer
R=$PWD/tests/device/reference
P1=18601
P2=18602
rm -rf "$W"
mkdir -p "$OUT" "$W"
exec > >(tee "$OUT/reference.log") 2>&1
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  SHAPE=tiny DEV=cpu ENERGY=--cpu-proxy
  # On the CPU the KV cache is sized from host memory: two servers would take it all.
  CB="--cb-num-blocks 256 --cb-block-size 32 --cb-max-batch-tokens 1024"
else
  SHAPE=llama-1b DEV=cuda:0 ENERGY=
  # Two servers share the GPU: each may take under half of its memory for the KV cache.
  CB="--cb-max-memory-percent 0.3"
fi
cleanup() {
  # Named pids only: a bare `wait` would also wait for the `tee` below, which never ends.
  for p in ${TR:-}; do kill -INT "$p"; wait "$p"; done 2>/dev/null
  for p in ${S1:-} ${S2:-} ${EL:-}; do kill "$p"; wait "$p"; done 2>/dev/null
}
trap cleanup EXIT
fail() { echo "FAILED: $*"; exit 3; }
load() { "$PY" "$R/load.py" "$@" --out "$W/load.jsonl" --shape "$SHAPE" --model "$W/model"; }

echo "== machine $(date -u +%FT%TZ)"
uname -r
if [ "$DRY" != 1 ]; then
  nvidia-smi --query-gpu=name,driver_version,power.draw,power.limit,clocks.max.sm --format=csv
fi
if [ -d .whl ]; then
  rm -rf /tmp/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl || fail "wheels"
  export PYTHONPATH=/tmp/site
fi
"$PY" -c 'import torch, transformers, fastapi, uvicorn; print("torch", torch.__version__, "transformers", transformers.__version__, "fastapi", fastapi.__version__)' \
  || fail "imports"

echo "== model"
"$PY" "$R/make_model.py" "$W/model" --shape "$SHAPE" --device "$DEV" 2>&1 | grep -v Writing | tail -n 2

echo "== servers"
serve() {
  "$PY" -c 'import sys; from transformers.cli.transformers import main; sys.argv[0] = "transformers"; main()' \
    serve "$W/model" --continuous-batching $CB --device "$DEV" --host 127.0.0.1 --port "$1" \
    --log-level warning > "$W/server-$1.log" 2>&1 &
}
serve $P1; S1=$!
serve $P2; S2=$!
for i in $(seq 240); do
  curl -sf "127.0.0.1:$P1/health" > /dev/null && curl -sf "127.0.0.1:$P2/health" > /dev/null && break
  sleep 0.5
done
curl -sf "127.0.0.1:$P1/health" > /dev/null && curl -sf "127.0.0.1:$P2/health" > /dev/null || {
  tail -n 20 "$W"/server-*.log; fail "servers did not start"; }
echo "S1 pid $S1 port $P1, S2 pid $S2 port $P2 ready after $((i / 2)) s"

"$PY" "$R/energy_log.py" "$W/energy.log" $ENERGY &
EL=$!

echo "== warm-up (not measured)"
load seq --port $P1 --label warm --n 4 --gap-s 0.1 > /dev/null
load seq --port $P2 --label warm2 --n 4 --gap-s 0.1 > /dev/null
load tput --port $P1 --label warm3 --seconds 3 --concurrency 16 > /dev/null

echo "== tput-pre"
load tput --port $P1 --label tput-pre --seconds 8 --concurrency 16

echo "== tracer"
"$T" record --port $P1 --port $P2 --store "$W/store" --out "$W/reference.rec" \
  --records-out "$W/records.jsonl" --summary-interval-ms 10000 2> "$W/tracer.log" &
TR=$!
for i in $(seq 120); do grep -q attached "$W/tracer.log" && break; sleep 0.5; done
grep -q attached "$W/tracer.log" || { tail -n 20 "$W/tracer.log"; fail "tracer did not attach"; }
sleep 1

echo "== smoke"
load periods --port-a $P1 --port-b $P1 --label smoke --reps 1 --arrive-s 4 --drain-s 3
sleep 4
SENT=$(grep -c '"id": "smoke-' "$W/load.jsonl")
GOT=$(grep -c '"external_id":"smoke-' "$W/records.jsonl" 2>/dev/null)
echo "smoke: $SENT requests sent, ${GOT:-0} recorded by tracer so far"
[ "${GOT:-0}" -ge $((SENT * 8 / 10)) ] || { tail -n 30 "$W/tracer.log"; fail "tracer missed smoke requests"; }
# The drain: 1.5 x the slowest smoke request, 3 to 8 s (the run must fit its time), so every
# period's requests end in it; any that do not are counted as spill.
DRAIN=$("$PY" -c '
import json, math, sys
lat = [(r["end_ns"] - r["start_ns"]) / 1e9 for r in map(json.loads, open(sys.argv[1]))
       if r.get("kind") == "request" and r["label"] == "smoke"]
print(min(8, max(3, math.ceil(1.5 * max(lat)))))' "$W/load.jsonl")
echo "drain ${DRAIN} s"

echo "== main"
load periods --port-a $P1 --port-b $P1 --label main --reps 3 --arrive-s 8 --drain-s "$DRAIN"
echo "== seq"
load seq --port $P1 --label seq --n 8 --gap-s 1.0
echo "== svc"
load periods --port-a $P1 --port-b $P2 --label svc --reps 3 --arrive-s 5 --drain-s "$DRAIN"
echo "== tput-with"
load tput --port $P1 --label tput-with --seconds 8 --concurrency 16
sleep 4
kill -INT $TR; wait $TR; TR=
echo "== tput-post"
load tput --port $P1 --label tput-post --seconds 8 --concurrency 16
kill $EL; wait $EL; EL=

echo "== tracer's log"
sed 's/\x1b\[[0-9;]*m//g' "$W/tracer.log" | grep -v 'summary:' | grep -E "attached|bound|clock|counter|idle|WARN|ERROR" | tail -n 20
sed 's/\x1b\[[0-9;]*m//g' "$W/tracer.log" | grep 'shutting down' 
echo "== replay"
"$T" replay "$W/reference.rec" --records-out "$W/replayed.jsonl" 2> /dev/null
cmp "$W/records.jsonl" "$W/replayed.jsonl" && echo "replay identical"
"$T" replay "$W/reference.rec" --split equal --records-out "$W/records-equal.jsonl" 2> /dev/null
echo "requests sent: $(grep -c '"kind": "request"' "$W/load.jsonl"), records: $(wc -l < "$W/records.jsonl"), counter reads: $(wc -l < "$W/energy.log")"
rm -rf "$W/model" "$W/store" "$W/replayed.jsonl"
tar czf "$OUT/reference.tgz" -C "$W" .
ls -l "$OUT"
