#!/bin/bash
# Second device check: what NVML queries cost on a real GPU, the sampler's cost in the daemon,
# and two independent services (two torch servers, a heavy and a light "model") sharing the
# GPU, split by NVML's per-process SM utilisation. Run from the repository root with the release
# binary at .devbin/tracer:  bash tests/device/check2.sh
set -u
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
T=$PWD/.devbin/tracer
exec > >(tee "$OUT/check2.log") 2>&1
A=18431; B=18432
echo "== sensors (per-call NVML costs)"
timeout 60 "$T" sensors --seconds 3 2>&1 | grep -v INFO
echo "== two servers on one GPU"
python3 tests/device/torch_server.py $A 24 > /tmp/a.log 2>&1 &
python3 tests/device/torch_server.py $B 4 > /tmp/b.log 2>&1 &
for i in $(seq 120); do grep -q listening /tmp/a.log && grep -q listening /tmp/b.log && break; sleep 0.5; done
cat /tmp/a.log /tmp/b.log
"$T" services --port $A --port $B
"$T" record --out "$OUT/shared.rec" --port $A --port $B --records-out "$OUT/shared-records.jsonl" \
  --summary-interval-ms 2000 2> "$OUT/shared-tracer.log" &
TR=$!
for i in $(seq 60); do grep -q attached "$OUT/shared-tracer.log" && break; sleep 0.5; done
timeout 240 python3 tests/device/client.py $A 40 4 > /tmp/ca.log 2>&1 &
CA=$!
timeout 240 python3 tests/device/client.py $B 160 4 > /tmp/cb.log 2>&1 &
CB=$!
wait $CA $CB
echo "A $(cat /tmp/ca.log)"; echo "B $(cat /tmp/cb.log)"
sleep 2
kill -INT $TR; wait $TR
sed 's/\x1b\[[0-9;]*m//g' "$OUT/shared-tracer.log" | grep -E "bound|released|sampler cpu|shutting|power:" | tail -12
pkill -f torch_server.py
"$T" replay "$OUT/shared.rec" --records-out /tmp/shared-replayed.jsonl
cmp "$OUT/shared-records.jsonl" /tmp/shared-replayed.jsonl && echo "replay identical"
"$T" replay "$OUT/shared.rec" --split equal --records-out /tmp/shared-equal.jsonl 2>/dev/null
python3 - "$OUT/shared-records.jsonl" /tmp/shared-equal.jsonl <<'PY'
import json, sys, statistics
for path in sys.argv[1:]:
    recs = [json.loads(l) for l in open(path)]
    by = {}
    for r in recs:
        by.setdefault(r["service_name"], []).append(r)
    print(path)
    for name, rs in sorted(by.items()):
        g = [sum(d["dynamic_j"] for d in r["devices"] if d["kind"] == "gpu") for r in rs]
        toks = [r.get("completion_tokens") or 0 for r in rs]
        print(f"  {name}: {len(rs)} requests, GPU dynamic {sum(g):.1f} J, {sum(g)/max(1,sum(toks)):.3f} J/token")
PY
