#!/usr/bin/env bash
# End-to-end A/B between two builds of tsubame, same load, interleaved by
# ../shared/bench/relay-vs.sh (so both see the same machine state):
#
#   smtp-source -> OLD on 127.0.0.1:2535 or NEW on :2537 -> smtp-sink :2526
#
#   benches/scripts/e2e-ab.sh OLD_BINARY NEW_BINARY [BENCH_DIR]
#
# Build an older revision with e.g.
#   git worktree add /tmp/old REV && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target \
#       cargo build --release -p tsubame)
# BENCH_DIR defaults to ../shared/bench beside the repository. Needs Debian's postfix
# package (smtp-source, smtp-sink). Env as for relay-vs.sh: MSGS=20000 SESSIONS=50
# PER_CONN=1 REPS=5 SIZES=1024. EXTRA_TOML is appended to both relays' configuration,
# OLD_TOML and NEW_TOML to one each (the same binary twice with two settings is an A/B of
# the setting: delivery-log-ab.sh); LABELS="old new" names them in the results. Results:
# $RESULTS (default /tmp/bench-results).
set -euo pipefail
old=${1:?usage: e2e-ab.sh OLD_BINARY NEW_BINARY [BENCH_DIR]}
new=${2:?usage: e2e-ab.sh OLD_BINARY NEW_BINARY [BENCH_DIR]}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bench=$(cd "${3:-$repo/../shared/bench}" && pwd)
export RESULTS=${RESULTS:-/tmp/bench-results} SIZES=${SIZES:-1024}
mkdir -p "$RESULTS"
work=$(mktemp -d /tmp/tsubame-e2e-ab.XXXXXX)
a= b=
cleanup() {
    for pid in $a $b; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

read -r old_label new_label <<<"${LABELS:-old new}"
printf '[[listener]]\naddress = "127.0.0.1:2535"\n%s\n%s\n' "${EXTRA_TOML:-}" "${OLD_TOML:-}" > "$work/old.toml"
printf '[[listener]]\naddress = "127.0.0.1:2537"\n%s\n%s\n' "${EXTRA_TOML:-}" "${NEW_TOML:-}" > "$work/new.toml"
# A last resort should the trap never run: the whole benchmark's worst case and more.
timeout 7200 "$old" serve --config "$work/old.toml" --spool "$work/spool-old" \
    --upstream smtp://127.0.0.1:2526 > "$work/old.log" 2>&1 &
a=$!
timeout 7200 "$new" serve --config "$work/new.toml" --spool "$work/spool-new" \
    --upstream smtp://127.0.0.1:2526 > "$work/new.log" 2>&1 &
b=$!
sleep 2
"$bench/relay-vs.sh" "$old_label:2535:2526:$a" "$new_label:2537:2526:$b"
