#!/usr/bin/env bash
# What the delivery log costs end to end (README, "Delivery log"): two tsubame relays, one
# with the default [delivery_log] (on) and one with `enabled = false`, same binary, same
# load, interleaved by ../shared/bench/relay-vs.sh (through e2e-ab.sh):
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
(cd "$repo" && cargo build --release -p tsubame)
tsubame=${CARGO_TARGET_DIR:-$repo/target}/release/tsubame
LABELS="log-on log-off" NEW_TOML=$'[delivery_log]\nenabled = false' \
    exec "$repo/benches/scripts/e2e-ab.sh" "$tsubame" "$tsubame" "$@"
