#!/bin/bash
# The daemon's CPU per request under one load mix, for A/B runs of two builds (issue 17).
#   tests/bench/daemon_cpu.sh sse|noop [perf|stat]
# Env: TRACER (binary, default target/release/tracer), N (requests), TOML (extra config text),
# PERFG (perf call-graph flags, with `perf`). Run as root from the repository root after
#   cargo build --release -p tracer --bin tracer -p tracer-tests --bin openai-axum --bin loadgen
# Prints the load's summary and the daemon's CPU (all threads, /proc) from the start of the
# load until 3 s after it, over the requests. perf.data is left in $D (default /tmp/daemon-cpu).
set -e
R=target/release
MODE=${1:-sse}; PERF=${2:-}
D=${D:-/tmp/daemon-cpu}; rm -rf "$D"; mkdir -p "$D"; printf "${TOML:-}" > "$D/tracer.toml"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
$R/openai-axum > "$D/axum.out" 2>/dev/null & AX=$!
trap 'kill $AX 2>/dev/null || true' EXIT
sleep 0.5; PORT=$(head -1 "$D/axum.out" | awk '{print $2}')
if [ "$MODE" = sse ]; then
  N=${N:-3000}; ARGS="--conns 128 --requests $N --max-tokens 64 --token-delay-ms 20 --stream"
else
  N=${N:-40000}; ARGS="--conns 32 --requests $N --max-tokens 4 --token-delay-ms 0"
fi
$R/loadgen --port "$PORT" $ARGS > /dev/null   # warm the server
RUST_LOG=info ${TRACER:-$R/tracer} run --port "$PORT" --store "$D/store" --api-socket "$D/sock" \
  --config "$D/tracer.toml" 2> "$D/tracer.log" & TR=$!
until grep -q attached "$D/tracer.log"; do sleep 0.1; done
$R/loadgen --port "$PORT" $ARGS > /dev/null   # warm the daemon (its cost model)
sleep 3
c0=$(awk '{print $14+$15}' /proc/$TR/stat)
threads() { for t in /proc/$TR/task/*; do echo "$(cat $t/comm) $(awk '{print $14+$15}' $t/stat)"; done; }
threads > "$D/threads0"
if [ "$PERF" = stat ]; then
  # Syscalls, switches and faults of the daemon's threads: what a CPU profile in a VM blurs.
  perf stat -e raw_syscalls:sys_enter,context-switches,page-faults,task-clock -p $TR \
    -o "$D/stat.txt" 2>/dev/null & PF=$!
elif [ -n "$PERF" ]; then
  perf record -e cpu-clock ${PERFG:--g} -p $TR -o "$D/perf.data" 2>/dev/null & PF=$!
fi
$R/loadgen --port "$PORT" $ARGS | tail -1
sleep 3
c1=$(awk '{print $14+$15}' /proc/$TR/stat)
threads > "$D/threads1"
if [ -n "$PERF" ]; then kill -INT $PF; wait $PF || true; fi
hz=$(getconf CLK_TCK)
awk -v t=$((c1 - c0)) -v hz="$hz" -v n="$N" \
  'BEGIN { printf "daemon CPU: %.2f µs per request (%d ticks, %d requests)\n", t * 1e6 / hz / n, t, n }'
# Per thread (same name summed): where the ticks went.
awk -v n="$N" -v hz="$(getconf CLK_TCK)" 'NR == FNR { a[$1] += $2; next } { b[$1] += $2 }
  END { for (k in b) if (b[k] - a[k] > 0) printf "  %s: %.2f µs per request\n", k, (b[k] - a[k]) * 1e6 / hz / n }' \
  "$D/threads0" "$D/threads1"
if [ "$PERF" = stat ]; then
  awk -v n="$N" '/raw_syscalls|context-switches|page-faults/ { gsub(",", "", $1); printf "%s per request: %.2f\n", $2, $1 / n }' "$D/stat.txt"
fi
# The store's group commits (records per transaction), where the build exports them.
curl -s --unix-socket "$D/sock" http://localhost/metrics |
  grep -E '^tracer_store_(transactions_total|records_total\{result="committed"\})' | sed 's/^/  /' || true
kill -INT $TR; wait $TR || true
