#!/bin/bash
# The device check for issues 6 and 7, run on a lent GPU machine from the repository root:
#   bash tests/device/check.sh        (expects the release binary at .devbin/tracer)
# 1. what the machine has: GPU identity from the driver, RAPL (perf `power` PMU), powercap;
# 2. `tracer sensors`: NVML energy counter period measured, instant power, CPU source chosen;
# 3. live: tracer attached by pid BEFORE a torch server starts (API process + engine process on
#    the GPU), 40 streaming requests, every input recorded; the real driver's ioctls must show a
#    compute context and a UVM registration of the GPU's UUID for the engine only;
# 4. late: a second tracer attached by port to the running server (seeding from /proc, NVML);
# 5. both recordings replayed: records identical.
set -u
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
T=$PWD/.devbin/tracer
exec > >(tee "$OUT/check.log") 2>&1
PORT=18431
echo "== machine"
uname -a
nvidia-smi --query-gpu=name,uuid,pci.bus_id,driver_version,power.draw,power.limit --format=csv
cat /proc/driver/nvidia/gpus/*/information 2>&1 | head -12
grep -i nvidia /proc/devices
ls -la /dev/nvidia* 2>&1
echo "== RAPL / powercap"
ls /sys/bus/event_source/devices/
ls /sys/bus/event_source/devices/power/events 2>&1
cat /sys/bus/event_source/devices/power/cpumask 2>&1
ls /sys/class/powercap 2>&1
echo "== sensors"
timeout 60 "$T" sensors --seconds 5 2>&1

echo "== live: tracer first, then the server"
mkfifo /tmp/go
bash -c 'read _ < /tmp/go; exec python3 tests/device/torch_server.py '$PORT > /tmp/server.log 2>&1 &
WRAP=$!
"$T" record --store "$OUT/store-live" --out "$OUT/live.rec" --pid $WRAP --records-out "$OUT/live-records.jsonl" \
  --events-out /tmp/live-events.jsonl --summary-interval-ms 5000 2> "$OUT/live-tracer.log" &
TR=$!
for i in $(seq 60); do grep -q attached "$OUT/live-tracer.log" && break; sleep 0.5; done
echo go > /tmp/go
for i in $(seq 120); do grep -q listening /tmp/server.log && break; sleep 0.5; done
cat /tmp/server.log
timeout 240 python3 tests/device/client.py $PORT 40 4
sleep 2
kill -INT $TR; wait $TR
grep '"kind":"gpu"' /tmp/live-events.jsonl > "$OUT/live-gpu-events.jsonl"
echo "gpu events:"; cat "$OUT/live-gpu-events.jsonl" | head -40
grep -E "bound|released|power:|NVML|shutting" "$OUT/live-tracer.log" | head -30

echo "== late: attach to the running server by port"
"$T" record --store "$OUT/store-late" --out "$OUT/late.rec" --port $PORT --records-out "$OUT/late-records.jsonl" \
  --summary-interval-ms 5000 2> "$OUT/late-tracer.log" &
TR=$!
for i in $(seq 60); do grep -q attached "$OUT/late-tracer.log" && break; sleep 0.5; done
timeout 240 python3 tests/device/client.py $PORT 40 4
sleep 2
kill -INT $TR; wait $TR
grep -E "bound|released|attached|shutting" "$OUT/late-tracer.log" | head -20
kill $WRAP 2>/dev/null; pkill -f torch_server.py

echo "== replay"
for r in live late; do
  "$T" replay "$OUT/$r.rec" --records-out "/tmp/$r-replayed.jsonl"
  cmp "$OUT/$r-records.jsonl" "/tmp/$r-replayed.jsonl" && echo "$r: replay identical"
done
python3 - "$OUT" <<'PY'
import json, sys, statistics
for r in ("live", "late"):
    recs = [json.loads(l) for l in open(f"{sys.argv[1]}/{r}-records.jsonl")]
    if not recs:
        print(r, "no records"); continue
    j = [x["total_j"] for x in recs]
    jt = [x["joules_per_output_token"] for x in recs if x.get("joules_per_output_token")]
    print(f"{r}: {len(recs)} records, total {sum(j):.1f} J, median {statistics.median(j):.2f} J/request,"
          f" median {statistics.median(jt) if jt else 0:.3f} J/token, services {sorted({x['service_name'] for x in recs})}")
PY
ls -la "$OUT"
