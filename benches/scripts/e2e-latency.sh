#!/bin/bash
# Accept-to-delivered latency at a fixed rate: tsubame bench --rate → tsubame →
# Postfix's smtp-sink, every message synced before its 250; percentiles from tsubame's
# own log (the "message accepted" and "delivered" lines of each message).
#
#   benches/scripts/e2e-latency.sh [RATE] [MSGS] [SIZE]     (defaults 3000 20000 1024)
#
# Needs a release build (cargo build --release) and smtp-sink (Debian: postfix).
# Ports 2545 (relay) and 2546 (sink) on 127.0.0.1.
set -euo pipefail
RATE=${1:-3000} MSGS=${2:-20000} SIZE=${3:-1024}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release/tsubame
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=$(mktemp -d)
sink_pid= relay_pid=
cleanup() {
    [ -z "$relay_pid" ] || kill "$relay_pid" 2>/dev/null || true
    [ -z "$sink_pid" ] || kill "$sink_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
user_flag=()
[ "$(id -u)" -ne 0 ] || user_flag=(-u root)
smtp-sink "${user_flag[@]}" -c 127.0.0.1:2546 1000 >/dev/null & sink_pid=$!
"$bin" serve --listen 127.0.0.1:2545 --spool "$work/spool" \
    --upstream smtp://127.0.0.1:2546 --log-level info 2>"$work/log" & relay_pid=$!
for _ in $(seq 50); do grep -q listening "$work/log" && break; sleep 0.1; done
"$bin" bench --target 127.0.0.1:2545 -n "$MSGS" -s "$SIZE" -c 50 --per-connection 1 \
    --rate "$RATE" --quiet
# Wait (up to 60 s) until every accepted message has its delivered line.
for _ in $(seq 600); do
    [ "$(grep -c ' delivered id=' "$work/log" || true)" -ge "$MSGS" ] && break
    sleep 0.1
done
python3 "$root/benches/scripts/latency_from_log.py" "$work/log"
