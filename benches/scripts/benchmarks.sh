#!/usr/bin/env bash
# Regenerates BENCHMARKS.md and benches/throughput.png: tsubame against Postfix on this
# machine, in one run, interleaved by ../shared/bench/relay-vs.sh:
#
#   1. end to end (smtp-source -> relay -> smtp-sink, both durable) and accept only
#      (tsubame --hold; Postfix with defer_transports=smtp), message sizes 1, 10 and
#      100 KiB, 1 to 200 sessions, a connection per message; msgs/s, relay CPU per
#      message, relay memory (peak resident set);
#   2. with DKIM (benches/scripts/e2e-dkim-vs-postfix.sh: RSA-2048, Postfix + OpenDKIM)
#      and with TLS (benches/scripts/tls-vs-postfix.sh), at their documented settings;
#   3. the page: medians of REPS repetitions, ratios, and a plot of throughput against
#      concurrency (benches/scripts/benchmarks_page.py; matplotlib from PyPI).
#
#   benches/scripts/benchmarks.sh [BENCH_DIR]
#
# Env: SESSIONS_LIST="1 10 50 100 200" SIZES="1024 10240 102400" MSGS=3000 REPS=3;
# PARTS="sweeps memory dkim tls" (a subset runs only those parts, into an existing
# RESULTS directory; the page is written from whatever the directory holds);
# SKIP_DKIM=1, SKIP_TLS=1 leave those parts (and their sections) out. Results go to
# $RESULTS (default /tmp/bench-results/benchmarks-DATE); the page is written into the
# repository. Needs Debian's postfix (and opendkim, openssl for the DKIM and TLS parts,
# which those scripts set up). Takes about half an hour on 2 cores.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bench=$(cd "${1:-$repo/../shared/bench}" && pwd)
export RESULTS=${RESULTS:-/tmp/bench-results/benchmarks-$(date -u +%Y%m%d-%H%M%S)}
export MSGS=${MSGS:-3000} REPS=${REPS:-3} PER_CONN=1
SESSIONS_LIST=${SESSIONS_LIST:-"1 10 50 100 200"}
export SIZES=${SIZES:-"1024 10240 102400"}
mkdir -p "$RESULTS"
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib
port=2535 sink_port=2526
spool=$(mktemp -d /tmp/tsubame-benchmarks.XXXXXX)
pid=
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
    rm -rf "$spool"
}
trap cleanup EXIT

(cd "$repo" && cargo build --release -p tsubame)
describe() {
    echo "machine=$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), $(df -T /tmp | awk 'NR==2 {print $2}') under /tmp"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "tsubame=$(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet || echo '+changes')"
    echo "postfix=$(dpkg-query -W -f '${Version}' postfix 2>/dev/null || echo unknown)"
    echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
    echo "settings=MSGS=$MSGS REPS=$REPS SIZES=\"$SIZES\" SESSIONS_LIST=\"$SESSIONS_LIST\" PER_CONN=1"
}
# A run of some parts into an existing directory keeps the first run's description.
if [ -e "$RESULTS/machine.txt" ]; then
    echo "# parts ${PARTS:-all} run again at $(date -u +%Y-%m-%dT%H:%MZ)" >> "$RESULTS/machine.txt"
else
    describe > "$RESULTS/machine.txt"
fi

start_tsubame() {  # start_tsubame [--hold]
    rm -rf "$spool/spool"
    "$repo/target/release/tsubame" serve --listen "127.0.0.1:$port" --spool "$spool/spool" \
        --upstream "smtp://127.0.0.1:$sink_port" --log-level warn "$@" >"$RESULTS/tsubame-serve.log" 2>&1 &
    pid=$!
    # (--log-level warn hides the "listening" line: wait for the port instead.)
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "tsubame did not start; see $RESULTS/tsubame-serve.log" >&2
    exit 1
}

stop_tsubame() {
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

pss_kib() {  # pss_kib PID...: the processes' proportional set sizes, summed (shared pages
    local total=0 kib p  # counted once over all of them, unlike resident sets)
    for p in "$@"; do
        kib=$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || true)
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

PARTS=${PARTS:-"sweeps memory dkim tls"}
if [[ " $PARTS " == *" sweeps "* ]]; then
    for sessions in $SESSIONS_LIST; do
        start_tsubame
        SESSIONS=$sessions OUT="$RESULTS/e2e-s$sessions.txt" "$bench/relay-vs.sh" postfix "tsubame:$port:$sink_port:$pid" \
            > "$RESULTS/e2e-s$sessions.summary"
        stop_tsubame
        start_tsubame --hold
        ACCEPT_ONLY=1 SESSIONS=$sessions OUT="$RESULTS/accept-s$sessions.txt" "$bench/relay-vs.sh" postfix "tsubame:$port:$sink_port:$pid" \
            > "$RESULTS/accept-s$sessions.summary"
        stop_tsubame
    done
fi

# Memory: each relay loaded end to end with 10 KiB messages at the highest concurrency;
# right after the run, the proportional set size of all its processes (Postfix's master
# and its children, tsubame's one process), and tsubame's peak resident set over the run.
if [[ " $PARTS " == *" memory "* ]]; then
    top=$(echo "$SESSIONS_LIST" | tr ' ' '\n' | tail -1)
    rm -f "$RESULTS/memory.txt"
    start_tsubame
    (cd "$bench" && ./measure.py --label tsubame-memory --sink smtp-sink --target "$port" --sink-port "$sink_port" \
        -l 10240 -s "$top" -n "$MSGS" --per-conn 1 --timeout 300 > /dev/null) || true
    echo "memory relay=tsubame sessions=$top pss_kib=$(pss_kib "$pid") peak_rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")" \
        >> "$RESULTS/memory.txt"
    stop_tsubame
    "$bench/postfix-relay.sh" start
    (cd "$bench" && ./measure.py --label postfix-memory --sink smtp-sink --target 2525 --sink-port 2526 \
        -l 10240 -s "$top" -n "$MSGS" --per-conn 1 --timeout 300 > /dev/null) || true
    master=$("$bench/postfix-relay.sh" pid)
    children=$(pgrep -P "$master" | tr '\n' ' ')
    # shellcheck disable=SC2086
    echo "memory relay=postfix sessions=$top pss_kib=$(pss_kib "$master" $children) processes=$((1 + $(echo $children | wc -w)))" \
        >> "$RESULTS/memory.txt"
    "$bench/postfix-relay.sh" stop
fi

if [[ " $PARTS " == *" dkim "* ]] && [ -z "${SKIP_DKIM:-}" ]; then
    RESULTS="$RESULTS/dkim" REPS=$REPS MSGS=$MSGS "$repo/benches/scripts/e2e-dkim-vs-postfix.sh" "$bench" \
        > "$RESULTS/dkim.out" 2>&1
fi
if [[ " $PARTS " == *" tls "* ]] && [ -z "${SKIP_TLS:-}" ]; then
    RESULTS="$RESULTS/tls" REPS=$REPS MSGS=$MSGS "$repo/benches/scripts/tls-vs-postfix.sh" "$bench" \
        > "$RESULTS/tls.out" 2>&1
fi

# The raw lines go beside the page (without the servers' logs), so that its numbers can be
# checked and the page rebuilt from them.
kept="$repo/benches/results/$(date -u +%Y-%m-%d)"
rm -rf "$kept" && mkdir -p "$kept"
(cd "$RESULTS" && find . -type f \( -name '*.txt' -o -name '*.summary' -o -name '*.out' \) \
    -not -path './dkim/dkim-check/*' -exec cp --parents {} "$kept/" \;)
python3 "$repo/benches/scripts/benchmarks_page.py" "$kept" "$repo/BENCHMARKS.md" "$repo/benches/throughput.png"
echo "BENCHMARKS.md and benches/throughput.png written from $kept (all of the run: $RESULTS)"
