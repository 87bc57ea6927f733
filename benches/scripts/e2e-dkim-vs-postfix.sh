#!/usr/bin/env bash
# DKIM signing cost, end to end, tsubame beside Postfix + OpenDKIM, on one machine in one run:
#
#   smtp-source -> relay on 127.0.0.1 -> smtp-sink -c (../shared/bench/measure.py)
#
# four configurations, all durable, all delivering to the same sink port:
#   tsubame        tsubame serve --config (a [[listener]] only) --upstream smtp://sink
#   tsubame-dkim   the same, its configuration with a [[dkim]] section (RSA 2048)
#   postfix        ../shared/bench/postfix-relay.sh's private instance, as e2e-vs-postfix.sh
#   postfix-dkim   a second private instance, identical but for smtpd_milters and
#                  non_smtpd_milters = OpenDKIM (Debian's opendkim, inet socket on loopback),
#                  milter_default_action = tempfail (no milter, no mail: nothing slips through
#                  unsigned); OpenDKIM in signing mode (Mode s), relaxed/relaxed, rsa-sha256
# Both signers use one key file (openssl genpkey, RSA 2048, PKCS#8) for d=source.test,
# s=bench: smtp-source writes "From: <bench@source.test>" (measure.py's -f).
#
# Before any measurement, every configuration gets a short check pass (dkim_check.py): a few
# messages into an aiosmtpd sink that keeps them; the signed ones must carry a
# DKIM-Signature d=source.test s=bench that verifies against the key (dkimpy, the record
# given to it directly: no DNS), the unsigned ones none. A tsubame that rejects [[dkim]] at
# start, or a relay that does not sign, stops the script there, with the reason.
# Then a warm-up run each, and REPS repetitions, each running every configuration once, in
# the order of CONFIGS and reversed on even repetitions. Prints medians and ratios (signed /
# unsigned per relay; tsubame signed / Postfix+OpenDKIM, the target being >= 5x) and CPU
# per message: the relay's process tree (measure.py --relay-pid), plus, for
# Postfix+OpenDKIM, the opendkim process (its utime+stime around each run, milter_cpu_s).
#
#   benches/scripts/e2e-dkim-vs-postfix.sh [BENCH_DIR]
#
# BENCH_DIR defaults to ../shared/bench beside the repository. Needs Debian's postfix (with
# smtp-source, smtp-sink), opendkim (`apt-get install -y opendkim opendkim-tools`; the
# system's OpenDKIM is never started, this script runs its own in the foreground), openssl,
# python3 with aiosmtpd (and dkimpy for the verification; scripts/test installs both).
# Runs as root, as postfix-relay.sh does. Env:
#   REPS=5 MSGS=20000 SESSIONS=50 SIZE=1024 PER_CONN=1 TIMEOUT=300 QUIET_WAIT=20 WARMUP=2000
#   CONFIGS="tsubame tsubame-dkim postfix postfix-dkim" (any subset, e.g. without
#     tsubame-dkim for a tsubame that cannot sign yet)
#   CHECK_COUNT=5 (messages per check pass)  NO_BUILD=1 (use the existing release binary)
#   TS_PORT=2535 TS_DKIM_PORT=2536 PF_PORT=2525 PF_DKIM_PORT=2545 SINK_PORT=2526 MILTER_PORT=8891
#   PF_PLAIN=/tmp/pf-dkimbench-plain PF_DKIM=/tmp/pf-dkimbench-dkim (private Postfix instances)
#   RESULTS=/tmp/bench-results (raw lines appended to $RESULTS/e2e-dkim-vs-postfix-DATE.txt)
# Everything runs on 127.0.0.1; every process started here is stopped by its PID (a trap),
# and the long-lived ones run under timeout(1) as a last resort.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bench=$(cd "${1:-$repo/../shared/bench}" && pwd)
REPS=${REPS:-5} MSGS=${MSGS:-20000} SESSIONS=${SESSIONS:-50} SIZE=${SIZE:-1024}
PER_CONN=${PER_CONN:-1} TIMEOUT=${TIMEOUT:-300} QUIET_WAIT=${QUIET_WAIT:-20} WARMUP=${WARMUP:-2000}
CONFIGS=${CONFIGS:-"tsubame tsubame-dkim postfix postfix-dkim"} CHECK_COUNT=${CHECK_COUNT:-5}
TS_PORT=${TS_PORT:-2535} TS_DKIM_PORT=${TS_DKIM_PORT:-2536} PF_PORT=${PF_PORT:-2525}
PF_DKIM_PORT=${PF_DKIM_PORT:-2545} SINK_PORT=${SINK_PORT:-2526} MILTER_PORT=${MILTER_PORT:-8891}
PF_PLAIN=${PF_PLAIN:-/tmp/pf-dkimbench-plain} PF_DKIM=${PF_DKIM:-/tmp/pf-dkimbench-dkim}
DOMAIN=source.test SELECTOR=bench  # measure.py sends From: <bench@source.test>
export RESULTS=${RESULTS:-/tmp/bench-results}
OUT=${OUT:-$RESULTS/e2e-dkim-vs-postfix-$(date +%Y%m%d-%H%M%S).txt}
mkdir -p "$RESULTS"
tsubame=${CARGO_TARGET_DIR:-$repo/target}/release/tsubame
scripts=$repo/benches/scripts
# The last resort for the long-lived processes, should the trap never run: the whole
# benchmark's worst case (every run timing out) plus an hour.
LIFETIME=$((REPS * 4 * (TIMEOUT + QUIET_WAIT + 10) + 4 * (TIMEOUT + 200) + 3600))

for word in $CONFIGS; do
    case $word in tsubame | tsubame-dkim | postfix | postfix-dkim) ;;
        *) echo "CONFIGS: unknown configuration $word" >&2; exit 2 ;; esac
done
has() { [[ " $CONFIGS " == *" $1 "* ]]; }
for port in $TS_PORT $TS_DKIM_PORT $PF_PORT $PF_DKIM_PORT $SINK_PORT $MILTER_PORT; do
    if ss -Hltn "sport = :$port" | grep -q .; then
        echo "port $port on this machine is in use already; set the *_PORT variables" >&2
        exit 1
    fi
done

work=$(mktemp -d /tmp/tsubame-dkim-bench.XXXXXX)
ts_pid= ts_dkim_pid= od_pid= pf_plain_started= pf_dkim_started=
stop_pid() {  # stop_pid PID: SIGTERM, then wait for it (bounded), then SIGKILL
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { echo "pid $pid ignores SIGTERM; SIGKILL" >&2; kill -KILL "$pid" 2>/dev/null || true; }
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_pid "$ts_pid"
    stop_pid "$ts_dkim_pid"
    [ -z "$pf_plain_started" ] || PF=$PF_PLAIN PORT=$PF_PORT "$bench/postfix-relay.sh" stop || true
    [ -z "$pf_dkim_started" ] || PF=$PF_DKIM PORT=$PF_DKIM_PORT "$bench/postfix-relay.sh" stop || true
    stop_pid "$od_pid"  # after Postfix: its smtpd would otherwise tempfail what is in flight
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The one signing key, for both signers; the DNS record for the check pass.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/key.pem" 2>"$work/openssl.log" ||
    { cat "$work/openssl.log" >&2; exit 1; }
chmod 600 "$work/key.pem"
txt="v=DKIM1; k=rsa; p=$(openssl pkey -in "$work/key.pem" -pubout -outform DER | base64 -w0)"

if has tsubame || has tsubame-dkim; then
    [ -n "${NO_BUILD:-}" ] || (cd "$repo" && cargo build --release -p tsubame)
fi
echo "machine: $(nproc) cores, $(uname -r); Postfix $(postconf -dh mail_version 2>/dev/null);" \
    "$(opendkim -V 2>/dev/null | head -1 | sed 's/^opendkim: //'); $(openssl version)"
echo "load: $MSGS messages of $SIZE bytes, $SESSIONS sessions, per_conn=$PER_CONN, $REPS repetitions; key RSA 2048, d=$DOMAIN s=$SELECTOR"

wait_listening() {  # wait_listening PORT PID: until PORT listens (10 s at most) or PID is gone
    local _
    for _ in $(seq 100); do
        ss -Hltn "sport = :$1" | grep -q . && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

started=
start_tsubame() {  # start_tsubame NAME PORT [dkim]; sets $started to the PID
    local name=$1 port=$2 cfg=$work/$1.toml log=$RESULTS/$1-serve.log pid
    printf '[[listener]]\naddress = "127.0.0.1:%s"\n' "$port" >"$cfg"
    if [ "${3:-}" = dkim ]; then
        printf '\n[[dkim]]\ndomain = "%s"\nselector = "%s"\nkey_file = "%s"\n' \
            "$DOMAIN" "$SELECTOR" "$work/key.pem" >>"$cfg"
    fi
    # The same flags as e2e-vs-postfix.sh; only the configuration file differs.
    timeout "$LIFETIME" "$tsubame" serve --config "$cfg" --listen "127.0.0.1:$port" --spool "$work/spool-$name" \
        --upstream "smtp://127.0.0.1:$SINK_PORT" --log-level warn >"$log" 2>&1 &
    pid=$!
    wait_listening "$port" "$pid" && { started=$pid; return 0; }
    {
        echo "tsubame ($name) did not start on 127.0.0.1:$port; its log ($log):"
        sed 's/^/    /' "$log"
        [ "${3:-}" != dkim ] || echo "(a tsubame without DKIM signing rejects the [[dkim]] section;" \
            "measure without it: CONFIGS=\"tsubame postfix postfix-dkim\")"
    } >&2
    stop_pid "$pid"
    return 1
}

if has tsubame; then start_tsubame tsubame "$TS_PORT"; ts_pid=$started; fi
if has tsubame-dkim; then start_tsubame tsubame-dkim "$TS_DKIM_PORT" dkim; ts_dkim_pid=$started; fi

if has postfix; then
    pf_plain_started=1
    PF=$PF_PLAIN PORT=$PF_PORT SINK_PORT=$SINK_PORT "$bench/postfix-relay.sh" start
fi
if has postfix-dkim; then
    # OpenDKIM: signing only, for DOMAIN (and nothing else), the shared key. Clients on
    # 127.0.0.1 are its default InternalHosts, so smtp-source's mail is signed. Foreground
    # (-f) as root, no syslog, no DNS needed to sign. RequireSafeKeys no: the key and this
    # file live under /tmp, which other users may write, and OpenDKIM refuses that path
    # otherwise; the key is read once at start, so this has no bearing on the cost measured.
    cat >"$work/opendkim.conf" <<EOF
Syslog                  no
LogWhy                  no
Mode                    s
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
Domain                  $DOMAIN
Selector                $SELECTOR
KeyFile                 $work/key.pem
OversignHeaders         From
RequireSafeKeys         no
Socket                  inet:$MILTER_PORT@127.0.0.1
PidFile                 $work/opendkim.pid
EOF
    timeout "$LIFETIME" opendkim -f -x "$work/opendkim.conf" >"$RESULTS/opendkim.log" 2>&1 &
    od_pid=$!
    wait_listening "$MILTER_PORT" "$od_pid" ||
        { echo "opendkim did not start on 127.0.0.1:$MILTER_PORT; its log:" >&2; cat "$RESULTS/opendkim.log" >&2; exit 1; }
    for _ in $(seq 50); do [ -s "$work/opendkim.pid" ] && break; sleep 0.1; done
    od_daemon=$(tr -d ' \n' <"$work/opendkim.pid" 2>/dev/null || pgrep -P "$od_pid")  # opendkim itself (od_pid is timeout's)
    [ -n "$od_daemon" ] && [ -r "/proc/$od_daemon/stat" ] || { echo "opendkim: no PID" >&2; exit 1; }
    pf_dkim_started=1
    PF=$PF_DKIM PORT=$PF_DKIM_PORT SINK_PORT=$SINK_PORT \
        PF_EXTRA="${PF_EXTRA:-} smtpd_milters=inet:127.0.0.1:$MILTER_PORT non_smtpd_milters=inet:127.0.0.1:$MILTER_PORT milter_default_action=tempfail" \
        "$bench/postfix-relay.sh" start
    [ "$(postconf -c "$PF_DKIM/etc" -h milter_default_action)" = tempfail ] ||
        { echo "postfix-dkim: milter_default_action is not tempfail" >&2; exit 1; }
fi

port_of() {
    case $1 in tsubame) echo "$TS_PORT" ;; tsubame-dkim) echo "$TS_DKIM_PORT" ;;
        postfix) echo "$PF_PORT" ;; postfix-dkim) echo "$PF_DKIM_PORT" ;; esac
}
pf_dir() { if [ "$1" = postfix ]; then echo "$PF_PLAIN"; else echo "$PF_DKIM"; fi; }
pid_of() {
    case $1 in tsubame) echo "$ts_pid" ;; tsubame-dkim) echo "$ts_dkim_pid" ;;
        *) PF=$(pf_dir "$1") "$bench/postfix-relay.sh" pid ;; esac
}
clk_tck=$(getconf CLK_TCK)
proc_cpu() {  # CPU seconds (utime+stime, with reaped children) of one process
    sed 's/^.*) //' "/proc/$1/stat" | awk -v hz="$clk_tck" '{ printf "%.2f", ($12 + $13 + $14 + $15) / hz }'
}
pf_drain() {  # a Postfix queue left over (a timed-out run) would leak into the next run
    local pf
    pf=$(pf_dir "$1")
    queued() { find "$pf/spool/"{maildrop,incoming,active,deferred,hold} -type f 2>/dev/null | wc -l; }
    for _ in $(seq 300); do [ "$(queued)" -eq 0 ] && return 0; sleep 0.1; done
    echo "# $1: queue not empty ($(queued) files); deleting" >&2
    postsuper -c "$pf/etc" -d ALL >/dev/null 2>&1 || true
}

# The check pass: signed where signing is configured, unsigned elsewhere; any failure stops here.
for config in $CONFIGS; do
    expect=unsigned
    [[ $config != *-dkim ]] || expect=signed
    python3 "$scripts/dkim_check.py" --label "$config" --target "$(port_of "$config")" \
        --sink-port "$SINK_PORT" --count "$CHECK_COUNT" --size "$SIZE" --expect "$expect" \
        --domain "$DOMAIN" --selector "$SELECTOR" --txt "$txt" --save "$RESULTS/dkim-check/$config"
    [[ $config != postfix* ]] || pf_drain "$config"
done

one() {  # one CONFIG MSGS [LABEL]: one measure.py run; its line (plus milter_cpu_s) on stdout
    local config=$1 line cpu0=
    [[ $config != postfix* ]] || pf_drain "$config"
    [ "$config" != postfix-dkim ] || cpu0=$(proc_cpu "$od_daemon")
    line=$("$bench/measure.py" --label "${3:-$config}" --target "$(port_of "$config")" --sink-port "$SINK_PORT" \
        --relay-pid "$(pid_of "$config")" -l "$SIZE" -s "$SESSIONS" -n "$2" --per-conn "$PER_CONN" \
        --timeout "$TIMEOUT" --quiet-wait "$QUIET_WAIT") || true
    [ -z "$cpu0" ] || line="$line milter_cpu_s=$(awk -v a="$cpu0" -v b="$(proc_cpu "$od_daemon")" 'BEGIN { printf "%.2f", b - a }')"
    echo "$line"
}

for config in $CONFIGS; do one "$config" "$WARMUP" warmup >/dev/null; done
read -r -a configs <<<"$CONFIGS"
for rep in $(seq "$REPS"); do
    order=("${configs[@]}")
    if [ $((rep % 2)) -eq 0 ]; then  # reverse order on even repetitions
        order=(); for ((i = ${#configs[@]} - 1; i >= 0; i--)); do order+=("${configs[i]}"); done
    fi
    for config in "${order[@]}"; do sleep 1; one "$config" "$MSGS" | tee -a "$OUT"; done
done
echo "raw results: $OUT"
python3 "$scripts/dkim_summary.py" "$OUT"
