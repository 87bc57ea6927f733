#!/usr/bin/env bash
# The accept-path benchmark of README's BENCHMARKS section, in one command:
#   1. tsubame against Postfix, accept only, interleaved, with ../shared/bench/relay-vs.sh
#   2. the harness ceiling (smtp-source straight into smtp-sink) with limits.sh
#   3. tsubame's resident memory with 1,000 idle connections
#
#   benches/scripts/accept-vs-postfix.sh [BENCH_DIR]
#
# BENCH_DIR defaults to ../shared/bench beside the repository. Needs Debian's postfix
# package (smtp-source, smtp-sink; `apt-get install -y postfix`, "No configuration").
# Env as for relay-vs.sh: MSGS=20000 SESSIONS=50 PER_CONN=1 REPS=5 SIZES="1024 10240".
# Results: $RESULTS (default /tmp/bench-results). Everything runs on 127.0.0.1 and every
# process started here is stopped by its PID.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bench=$(cd "${1:-$repo/../shared/bench}" && pwd)
export RESULTS=${RESULTS:-/tmp/bench-results}
mkdir -p "$RESULTS"
port=2535 sink_port=2526 idle_port=2555
spool=$(mktemp -d /tmp/tsubame-bench-spool.XXXXXX)
pid=

cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
    rm -rf "$spool"
}
trap cleanup EXIT

start_tsubame() {  # start_tsubame PORT
    rm -rf "$spool/spool"
    # --hold: accept only, like Postfix with defer_transports=smtp.
    "$repo/target/release/tsubame" serve --listen "127.0.0.1:$1" --spool "$spool/spool" --hold \
        >"$RESULTS/tsubame-serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do
        grep -q listening "$RESULTS/tsubame-serve.log" && return 0
        sleep 0.1
    done
    echo "tsubame did not start; see $RESULTS/tsubame-serve.log" >&2
    exit 1
}

stop_tsubame() {
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=
}

(cd "$repo" && cargo build --release -p tsubame)
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), $(df -T /tmp | awk 'NR==2 {print $2}') under /tmp"

start_tsubame "$port"
ACCEPT_ONLY=1 OUT="$RESULTS/accept-vs-postfix.txt" "$bench/relay-vs.sh" postfix "tsubame:$port:$sink_port:$pid"
stop_tsubame

PARTS=ceiling SIZES="${SIZES:-1024 10240}" SESSIONS="${SESSIONS:-50}" PER_CONNS="${PER_CONN:-1}" \
    REPS="${REPS:-5}" OUT="$RESULTS/ceiling.txt" "$bench/limits.sh"

start_tsubame "$idle_port"
python3 "$repo/benches/scripts/idle_connections.py" --port "$idle_port" --pid "$pid" --connections 1000
stop_tsubame
