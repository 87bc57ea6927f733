#!/usr/bin/env bash
# TLS against plain text, tsubame beside Postfix, on one machine in one run, interleaved:
#   1. handshakes/s: connect, greeting, EHLO, [STARTTLS, handshake, EHLO], QUIT
#      (`tsubame bench --handshakes`), plain and STARTTLS;
#   2. accepted msgs/s, plain and STARTTLS, SIZE bytes, SESSIONS sessions, one message per
#      connection (per_conn_1) and connections kept open (per_conn_0);
#   3. CPU of each server's process tree per handshake or message.
# `tsubame bench` is the client for both servers (smtp-source has no TLS); the certificate
# is a throwaway one made here with openssl, not verified by the client, and every
# connection does a full handshake (RESUME=1: resume when the server allows it).
# Both servers only accept: tsubame `serve --hold` with a [[listener]] that has
# certificate_file and key_file (STARTTLS offered); Postfix through
# ../shared/bench/postfix-relay.sh with defer_transports=smtp, smtpd_tls_security_level=may,
# the same certificate, tlsmgr, and Postfix's defaults otherwise (session cache included).
# Each repetition runs every configuration once, servers in A B / B A order. Prints the
# medians and the ratios STARTTLS/plain and tsubame/Postfix as markdown tables.
#
#   benches/scripts/tls-vs-postfix.sh [BENCH_DIR]
#
# BENCH_DIR defaults to ../shared/bench beside the repository. Needs Debian's postfix
# package and openssl. Env:
#   REPS=3 SESSIONS=50 SIZE=1024 MSGS=20000 HANDSHAKES=5000 TIMEOUT=300 QUIET_WAIT=20
#   SERVERS="tsubame postfix"  TLS_MODES="plain starttls"  LOADS="handshakes per_conn_1 per_conn_0"
#   KEY=ec (P-256 certificate) | rsa (RSA 2048)    RESUME=1 (bench --tls-resume)
#   TS_PORT=2535 PF_PORT=2545 PF=/tmp/pftls (the private Postfix instance; its sink port,
#   PF_PORT+1, is never used: nothing is delivered)
#   RESULTS=/tmp/bench-results (raw lines appended to $RESULTS/tls-vs-postfix-DATE.txt)
# A server that does not offer STARTTLS stops the script before any measurement, with the
# reason; measure one server or plain text only with SERVERS=postfix or TLS_MODES=plain.
# Everything runs on 127.0.0.1; every process started here is stopped by its PID.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bench=$(cd "${1:-$repo/../shared/bench}" && pwd)
REPS=${REPS:-3} SESSIONS=${SESSIONS:-50} SIZE=${SIZE:-1024} MSGS=${MSGS:-20000}
HANDSHAKES=${HANDSHAKES:-5000} TIMEOUT=${TIMEOUT:-300} QUIET_WAIT=${QUIET_WAIT:-20}
SERVERS=${SERVERS:-"tsubame postfix"} TLS_MODES=${TLS_MODES:-"plain starttls"}
LOADS=${LOADS:-"handshakes per_conn_1 per_conn_0"} KEY=${KEY:-ec}
TS_PORT=${TS_PORT:-2535} PF_PORT=${PF_PORT:-2545}
export PF=${PF:-/tmp/pftls}
export RESULTS=${RESULTS:-/tmp/bench-results}
OUT=${OUT:-$RESULTS/tls-vs-postfix-$(date +%Y%m%d-%H%M%S).txt}
mkdir -p "$RESULTS"
tsubame=${CARGO_TARGET_DIR:-$repo/target}/release/tsubame
run_py=$repo/benches/scripts/tls_run.py

for word in $SERVERS; do
    case $word in tsubame | postfix) ;; *) echo "SERVERS: unknown server $word" >&2; exit 2 ;; esac
done
for word in $TLS_MODES; do
    case $word in plain | starttls) ;; *) echo "TLS_MODES: unknown mode $word" >&2; exit 2 ;; esac
done
for word in $LOADS; do
    case $word in handshakes | per_conn_1 | per_conn_0) ;; *) echo "LOADS: unknown load $word" >&2; exit 2 ;; esac
done
has() { [[ " $1 " == *" $2 "* ]]; }

work=$(mktemp -d /tmp/tsubame-tls-bench.XXXXXX)
ts_pid= pf_started=
cleanup() {
    if [ -n "$ts_pid" ]; then
        kill "$ts_pid" 2>/dev/null || true
        wait "$ts_pid" 2>/dev/null || true
    fi
    [ -z "$pf_started" ] || PORT=$PF_PORT "$bench/postfix-relay.sh" stop || true
    rm -rf "$work"
}
trap cleanup EXIT

# The throwaway certificate, for 127.0.0.1 and localhost, shared by both servers.
case $KEY in
    ec) key_options=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
    rsa) key_options=(-newkey rsa:2048) ;;
    *) echo "KEY must be ec or rsa" >&2; exit 2 ;;
esac
openssl req -x509 "${key_options[@]}" -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>"$work/openssl.log" ||
    { cat "$work/openssl.log" >&2; exit 1; }

(cd "$repo" && cargo build --release -p tsubame)
echo "machine: $(nproc) cores, $(uname -r); $(postconf -d mail_version 2>/dev/null); $(openssl version)"
handshake_note="every connection a full TLS handshake"
[ -z "${RESUME:-}" ] || handshake_note="TLS sessions resumed when the server allows (--tls-resume)"
echo "certificate: $KEY; client: tsubame bench, $handshake_note"

if has "$SERVERS" tsubame; then
    cat >"$work/tsubame.toml" <<EOF
[[listener]]
address = "127.0.0.1:$TS_PORT"
certificate_file = "$work/cert.pem"
key_file = "$work/key.pem"

[spool]
directory = "$work/spool"
EOF
    "$tsubame" serve --config "$work/tsubame.toml" --hold --log-level warn >"$RESULTS/tsubame-tls-serve.log" 2>&1 &
    ts_pid=$!
    for _ in $(seq 100); do
        ss -Hltn "sport = :$TS_PORT" | grep -q . && break
        kill -0 "$ts_pid" 2>/dev/null || break
        sleep 0.1
    done
    ss -Hltn "sport = :$TS_PORT" | grep -q . ||
        { echo "tsubame did not start on $TS_PORT; see $RESULTS/tsubame-tls-serve.log" >&2; exit 1; }
fi

if has "$SERVERS" postfix; then
    # postfix-relay.sh writes main.cf and master.cf; TLS goes in through PF_EXTRA, and
    # tlsmgr (in Postfix's stock master.cf, not in the harness's) is added before the
    # reload: without it smtpd logs "no entropy for TLS key generation: disabling TLS
    # support" and answers STARTTLS with 454.
    PF_EXTRA="${PF_EXTRA:-} defer_transports=smtp smtpd_tls_security_level=may \
smtpd_tls_cert_file=$work/cert.pem smtpd_tls_key_file=$work/key.pem" \
        PORT=$PF_PORT SINK_PORT=$((PF_PORT + 1)) "$bench/postfix-relay.sh" start
    pf_started=1
    postconf -c "$PF/etc" -Me 'tlsmgr/unix=tlsmgr unix - - n 1000? 1 tlsmgr'
    script -qec "postfix -c $PF/etc reload" /dev/null >/dev/null
    for _ in $(seq 50); do [ -S "$PF/spool/private/tlsmgr" ] && break; sleep 0.1; done
    [ -S "$PF/spool/private/tlsmgr" ] || { echo "postfix: no tlsmgr socket after reload" >&2; exit 1; }
fi

port_of() { if [ "$1" = tsubame ]; then echo "$TS_PORT"; else echo "$PF_PORT"; fi; }
pid_of() { if [ "$1" = tsubame ]; then echo "$ts_pid"; else PORT=$PF_PORT "$bench/postfix-relay.sh" pid; fi; }
tls_flags() { [ "$1" = plain ] || echo "--starttls${RESUME:+ --tls-resume}"; }

# Before any measurement: every server answers, in every mode asked for (a server that
# does not offer STARTTLS fails here, with the bench's reason).
for server in $SERVERS; do
    for security in $TLS_MODES; do
        # shellcheck disable=SC2046 # tls_flags is zero or more words
        if ! check=$("$tsubame" bench --target "127.0.0.1:$(port_of "$server")" $(tls_flags "$security") \
            --handshakes -n 1 -c 1 --timeout 10 --quiet 2>&1); then
            echo "tls-vs-postfix: $server on 127.0.0.1:$(port_of "$server") fails $security set-up:" >&2
            echo "$check" | sed 's/^/    /' >&2
            others=$(for word in $SERVERS; do [ "$word" = "$server" ] || printf '%s ' "$word"; done)
            [ "$security" = plain ] ||
                echo "(measure without it: SERVERS=\"${others% }\" or TLS_MODES=plain)" >&2
            exit 1
        fi
        echo "$server $security: ${check##* }"
    done
done

one() {  # one SERVER LOAD SECURITY
    local server=$1 load=$2 security=$3 load_args
    case $load in
        handshakes) load_args=(--handshakes -n "$HANDSHAKES") ;;
        per_conn_1) load_args=(-n "$MSGS" -s "$SIZE" --per-connection 1) ;;
        per_conn_0) load_args=(-n "$MSGS" -s "$SIZE" --per-connection 0) ;;
    esac
    # Postfix defers what it accepted: empty its queue between runs, so that every run
    # starts from the same small queue (as postfix-relay.sh's own runs do) and no queue
    # scan of earlier runs' messages lands in this run's CPU.
    [ "$server" != postfix ] || postsuper -c "$PF/etc" -d ALL >/dev/null 2>&1 || true
    # shellcheck disable=SC2046
    "$run_py" --server-pid "$(pid_of "$server")" --quiet-wait "$QUIET_WAIT" --timeout "$TIMEOUT" \
        "server=$server" "load=$load" "security=$security" "sessions=$SESSIONS" -- \
        "$tsubame" bench --target "127.0.0.1:$(port_of "$server")" $(tls_flags "$security") \
        -c "$SESSIONS" --timeout 60 --quiet "${load_args[@]}" | tee -a "$OUT" || true
}

# Warm-up: each server, each mode, a short run (smtpd processes forked, caches filled).
for server in $SERVERS; do
    for security in $TLS_MODES; do
        # shellcheck disable=SC2046
        "$tsubame" bench --target "127.0.0.1:$(port_of "$server")" $(tls_flags "$security") \
            -n 1000 -c "$SESSIONS" --quiet >/dev/null || true
    done
done

read -r -a servers <<<"$SERVERS"
for rep in $(seq "$REPS"); do
    order=("${servers[@]}")
    if [ $((rep % 2)) -eq 0 ]; then  # reverse order on even repetitions
        order=(); for ((i = ${#servers[@]} - 1; i >= 0; i--)); do order+=("${servers[i]}"); done
    fi
    for load in $LOADS; do
        for security in $TLS_MODES; do
            for server in "${order[@]}"; do sleep 1; one "$server" "$load" "$security"; done
        done
    done
done
echo "raw results: $OUT"
"$run_py" --summarize "$OUT"
