#!/usr/bin/env bash
# What the delivery log costs end to end (README, "Delivery log"): two tsubame relays, one
# with the default [delivery_log] (on) and one with `enabled = false`, same binary, same
# load, interleaved by ../shared/bench/relay-vs.sh:
#
#   smtp-source -> tsubame on 127.0.0.1:2535 (log on) or :2537 (log off) -> smtp-sink :2526
#
#   benches/scripts/delivery-log-ab.sh [BENCH_DIR]
#
# BENCH_DIR defaults to ../shared/bench beside the repository. Needs Debian's postfix
# package (smtp-source, smtp-sink). Env as for relay-vs.sh: MSGS=20000 SESSIONS=50
# PER_CONN=1 REPS=5 SIZES=1024. Results: $RESULTS (default /tmp/bench-results).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bench=$(cd "${1:-$repo/../shared/bench}" && pwd)
export RESULTS=${RESULTS:-/tmp/bench-results} SIZES=${SIZES:-1024}
mkdir -p "$RESULTS"
work=$(mktemp -d /tmp/tsubame-log-ab.XXXXXX)
on= off=
cleanup() {
    for pid in $on $off; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

(cd "$repo" && cargo build --release -p tsubame)
tsubame=${CARGO_TARGET_DIR:-$repo/target}/release/tsubame
printf '[[listener]]\naddress = "127.0.0.1:2535"\n' > "$work/on.toml"
printf '[[listener]]\naddress = "127.0.0.1:2537"\n[delivery_log]\nenabled = false\n' > "$work/off.toml"
# A last resort should the trap never run: the whole benchmark's worst case and more.
timeout 7200 "$tsubame" serve --config "$work/on.toml" --spool "$work/spool-on" \
    --upstream smtp://127.0.0.1:2526 > "$work/on.log" 2>&1 &
on=$!
timeout 7200 "$tsubame" serve --config "$work/off.toml" --spool "$work/spool-off" \
    --upstream smtp://127.0.0.1:2526 > "$work/off.log" 2>&1 &
off=$!
sleep 2
"$bench/relay-vs.sh" "log-on:2535:2526:$on" "log-off:2537:2526:$off"
