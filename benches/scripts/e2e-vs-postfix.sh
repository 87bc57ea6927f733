#!/usr/bin/env bash
# The end-to-end benchmark of README's BENCHMARKS section, in one command:
#   1. smtp-source → relay → smtp-sink, tsubame against Postfix, both durable,
#      interleaved, with ../shared/bench/relay-vs.sh (counts every message at the sink)
#   2. the harness ceiling (smtp-source straight into smtp-sink) with limits.sh
#   3. tsubame's accept-to-delivered latency at half its maximum rate (e2e-latency.sh)
#
#   benches/scripts/e2e-vs-postfix.sh [BENCH_DIR]
#
# BENCH_DIR defaults to ../shared/bench beside the repository. Needs Debian's postfix
# package (smtp-source, smtp-sink). Env as for relay-vs.sh: MSGS=20000 SESSIONS=50
# PER_CONN=1 REPS=5 SIZES="1024 10240"; LATENCY_RATE=3300 (about half the 1 KiB rate
# measured here). Results: $RESULTS (default /tmp/bench-results).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bench=$(cd "${1:-$repo/../shared/bench}" && pwd)
export RESULTS=${RESULTS:-/tmp/bench-results}
mkdir -p "$RESULTS"
port=2535 sink_port=2526
spool=$(mktemp -d /tmp/tsubame-bench-spool.XXXXXX)
pid=

cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
    rm -rf "$spool"
}
trap cleanup EXIT

(cd "$repo" && cargo build --release -p tsubame)
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), $(df -T /tmp | awk 'NR==2 {print $2}') under /tmp"

# measure.py starts smtp-sink on $sink_port for every run; tsubame delivers there, as the
# private Postfix instance does (postfix-relay.sh: 2525 → 2526).
"$repo/target/release/tsubame" serve --listen "127.0.0.1:$port" --spool "$spool/spool" \
    --upstream "smtp://127.0.0.1:$sink_port" --log-level warn >"$RESULTS/tsubame-serve.log" 2>&1 &
pid=$!
for _ in $(seq 50); do grep -q listening "$RESULTS/tsubame-serve.log" && break; sleep 0.1; done
OUT="$RESULTS/e2e-vs-postfix.txt" "$bench/relay-vs.sh" postfix "tsubame:$port:$sink_port:$pid"
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=

PARTS=ceiling SIZES="${SIZES:-1024 10240}" SESSIONS="${SESSIONS:-50}" PER_CONNS="${PER_CONN:-1}" \
    REPS="${REPS:-5}" OUT="$RESULTS/ceiling.txt" "$bench/limits.sh"

for _ in 1 2 3; do "$repo/benches/scripts/e2e-latency.sh" "${LATENCY_RATE:-3300}" 20000 1024; done
