#!/usr/bin/env bash
# Accept-path A/B between two builds of tsubame, interleaved A B / B A per repetition:
# `serve --hold` (accept and spool, deliver nothing) loaded by `tsubame bench`, one
# message per connection and connections kept open. Prints each run and the medians of
# msgs/s and of the server's CPU per message (utime + stime from /proc).
#
#   benches/scripts/accept-ab.sh OLD_BINARY NEW_BINARY
#
# Build an older revision with e.g.
#   git worktree add /tmp/old REV && (cd /tmp/old && cargo build --release -p tsubame)
# and pass /tmp/old/target/release/tsubame and target/release/tsubame.
# Env: REPS=3 MSGS=20000 SESSIONS=50. Everything runs on 127.0.0.1; every process started
# here is stopped by its PID.
set -euo pipefail
old=${1:?usage: accept-ab.sh OLD_BINARY NEW_BINARY}
new=${2:?usage: accept-ab.sh OLD_BINARY NEW_BINARY}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
client="$repo/target/release/tsubame"
REPS=${REPS:-3} MSGS=${MSGS:-20000} SESSIONS=${SESSIONS:-50}
work=$(mktemp -d /tmp/tsubame-ab.XXXXXX)
pid=
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
ticks=$(getconf CLK_TCK)

run() {  # run LABEL BINARY PER_CONNECTION
    local label=$1 binary=$2 per_connection=$3 port=2601
    rm -rf "$work/spool"
    "$binary" serve --listen "127.0.0.1:$port" --spool "$work/spool" --hold --log-level warn \
        >"$work/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do
        "$client" bench --target "127.0.0.1:$port" -n 1 -c 1 --quiet >/dev/null 2>&1 && break
        sleep 0.1
    done
    local before after report rate
    before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    report=$("$client" bench --target "127.0.0.1:$port" -n "$MSGS" -c "$SESSIONS" \
        --per-connection "$per_connection" --quiet)
    after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    rate=$(tr ' ' '\n' <<<"$report" | sed -n 's/^msgs_per_s=//p')
    echo "$label per_connection=$per_connection msgs_per_s=$rate cpu_us_per_msg=$(( (after - before) * 1000000 / ticks / MSGS ))"
}

results=$work/results.txt
for rep in $(seq "$REPS"); do
    for per_connection in 1 0; do
        if (( rep % 2 )); then
            run old "$old" "$per_connection"; run new "$new" "$per_connection"
        else
            run new "$new" "$per_connection"; run old "$old" "$per_connection"
        fi
    done
done | tee "$results"
echo
echo "medians of $REPS:"
for label in old new; do
    for per_connection in 1 0; do
        grep "^$label per_connection=$per_connection " "$results" | python3 -c '
import statistics, sys
rows = [dict(f.split("=") for f in line.split()[1:]) for line in sys.stdin]
print(sys.argv[1], "per_connection=" + sys.argv[2],
      "msgs_per_s=%.0f" % statistics.median(float(r["msgs_per_s"]) for r in rows),
      "cpu_us_per_msg=%.0f" % statistics.median(float(r["cpu_us_per_msg"]) for r in rows))
' "$label" "$per_connection"
    done
done
