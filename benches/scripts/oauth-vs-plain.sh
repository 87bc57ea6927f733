#!/usr/bin/env bash
# Delivery through an OAuth2 (XOAUTH2) upstream against a plain one, on one machine in one
# run, interleaved (A B / B A per repetition), and how many deliveries each token refresh
# serves:
#
#   tsubame bench ─► tsubame serve ─STARTTLS, AUTH XOAUTH2─► aiosmtpd_sink.py (config xoauth2)
#                         │ refresh-token grant
#                         └─► token_endpoint.py (http, 127.0.0.1; tokens live EXPIRES_IN s)
#   tsubame bench ─► tsubame serve ─STARTTLS, no AUTH──────► aiosmtpd_sink.py (config plain)
#   tsubame bench ─STARTTLS─► aiosmtpd_sink.py, no relay: the peer's ceiling (config ceiling)
#
# The SMTP peers are one program (crates/delivery/tests/peers/aiosmtpd_sink.py), STARTTLS
# required with a throwaway certificate made here; the XOAUTH2 one requires AUTH and accepts
# only tokens the token endpoint peer (crates/oauth/tests/peers/token_endpoint.py) issued
# for the account's refresh token (--issued-tokens and --grants: it reads the endpoint's
# request log; expiry is not checked). tsubame
# verifies the peer's certificate (ca_file) and gets its tokens with a refresh token that
# exists only for the run. Config xoauth2_two sends through a third tsubame whose upstream
# maps two senders to two accounts (`[[upstream.account_map]]`), with two benches at once,
# one per sender, half the messages and sessions each.
#
# Each run waits until the peer has every message; see oauth_run.py for the fields. Prints
# medians [min-max], the ratios XOAUTH2/plain, and refreshes and logins per message as
# markdown tables.
#
#   benches/scripts/oauth-vs-plain.sh
#
# Env: REPS=3 MSGS=5000 SIZE=1024 SESSIONS=50 EXPIRES_IN=10 TIMEOUT=180 QUIET_WAIT=20
#      CONFIGS="plain xoauth2 xoauth2_two ceiling"
#      PORT_BASE=2555 (tsubame on PORT_BASE..+2, the peers on PORT_BASE+10, +11)
#      RESULTS=/tmp/bench-results (raw lines appended to $RESULTS/oauth-vs-plain-DATE.txt)
#      KEEP=1 keeps the work directory (configurations, logs, the peers' files)
# Needs python3 with aiosmtpd, and openssl. Everything runs on 127.0.0.1; every process
# started here is stopped by its PID.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
REPS=${REPS:-3} MSGS=${MSGS:-5000} SIZE=${SIZE:-1024} SESSIONS=${SESSIONS:-50}
EXPIRES_IN=${EXPIRES_IN:-10} TIMEOUT=${TIMEOUT:-180} QUIET_WAIT=${QUIET_WAIT:-20}
CONFIGS=${CONFIGS:-"plain xoauth2 xoauth2_two ceiling"}
PORT_BASE=${PORT_BASE:-2555}
export RESULTS=${RESULTS:-/tmp/bench-results}
OUT=${OUT:-$RESULTS/oauth-vs-plain-$(date +%Y%m%d-%H%M%S).txt}
mkdir -p "$RESULTS"
tsubame=${CARGO_TARGET_DIR:-$repo/target}/release/tsubame
run_py=$repo/benches/scripts/oauth_run.py
sink_py=$repo/crates/delivery/tests/peers/aiosmtpd_sink.py
endpoint_py=$repo/crates/oauth/tests/peers/token_endpoint.py

for word in $CONFIGS; do
    case $word in plain | xoauth2 | xoauth2_two | ceiling) ;;
        *) echo "CONFIGS: unknown configuration $word" >&2; exit 2 ;; esac
done
has() { [[ " $CONFIGS " == *" $1 "* ]]; }
# tsubame's default upstream pool: max_connections 20, max_messages_per_connection 100.
# The ceiling run loads the peer the same way.
POOL_CONNECTIONS=20 POOL_MESSAGES=100
# EXPIRES_IN: what the token endpoint's tokens are good for. The relay's cache refreshes a
# token this short-lived at half its life (its 5-minute margin is more than half of it), so
# with the default 10 s a run of MSGS=5000 (8-13 s at the Python peer's pace) sees a
# refresh or two under load besides the one at its start; Google's hour-long tokens would
# see none in a run this short.
ACCOUNT=bench@tsubame.test ACCOUNT_A=bench-a@tsubame.test ACCOUNT_B=bench-b@tsubame.test
CLIENT_ID=bench-client.apps.googleusercontent.com

ts_port() { case $1 in plain) echo "$PORT_BASE" ;; xoauth2) echo $((PORT_BASE + 1)) ;;
    xoauth2_two) echo $((PORT_BASE + 2)) ;; esac; }
PEER_XOAUTH2_PORT=$((PORT_BASE + 10)) PEER_PLAIN_PORT=$((PORT_BASE + 11))
for port in "$PORT_BASE" $((PORT_BASE + 1)) $((PORT_BASE + 2)) "$PEER_XOAUTH2_PORT" "$PEER_PLAIN_PORT"; do
    if ss -Hltn "sport = :$port" | grep -q .; then
        echo "port $port is in use; choose another PORT_BASE" >&2; exit 1
    fi
done

work=$(mktemp -d /tmp/tsubame-oauth-bench.XXXXXX)
declare -A pid_of=()
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for WHAT PID TEST...: up to 10 s for TEST to pass while PID lives
    local what=$1 pid=$2; shift 2
    for _ in $(seq 100); do
        "$@" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "$what did not start; its output:" >&2
    cat "$work/$what.log" >&2 2>/dev/null || true
    exit 1
}
listening() { ss -Hltn "sport = :$1" | grep -q .; }

# Secrets made for this run only: the OAuth client's secret and the refresh token.
umask 077
openssl rand -hex 16 >"$work/client.secret"
refresh_token="1//bench-$(openssl rand -hex 16)"
mkdir "$work/tokens"
for account in "$ACCOUNT" "$ACCOUNT_A" "$ACCOUNT_B"; do
    echo "$refresh_token" >"$work/tokens/$account.token"
done
umask 022
# A throwaway CA and a P-256 server certificate it signs for 127.0.0.1, as the delivery
# tests make them (crates/delivery/tests/common): tsubame verifies the peer against the CA
# (webpki refuses a self-signed CA certificate used as the server's own).
cat >"$work/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = tsubame bench
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
new_key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
{
    openssl req -x509 -config "$work/openssl.cnf" -extensions ca_ext -days 2 "${new_key[@]}" \
        -keyout "$work/ca.key" -out "$work/ca.pem" -subj "/CN=tsubame bench CA" &&
        openssl req -new -config "$work/openssl.cnf" "${new_key[@]}" \
            -keyout "$work/key.pem" -out "$work/server.csr" -subj /CN=127.0.0.1 &&
        openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
            -set_serial 2 -days 2 -extfile "$work/openssl.cnf" -extensions leaf_ext \
            -out "$work/cert.pem"
} >"$work/openssl.log" 2>&1 || { cat "$work/openssl.log" >&2; exit 1; }

(cd "$repo" && cargo build --release -p tsubame)
echo "machine: $(nproc) cores, $(uname -r); python $(python3 -c 'import platform; print(platform.python_version())'), aiosmtpd $(python3 -c 'import aiosmtpd; print(aiosmtpd.__version__)'); $(openssl version)"
echo "load: $MSGS messages of $SIZE bytes, $SESSIONS sessions, one message per connection; tokens live $EXPIRES_IN s"

# The token endpoint: it exits when its standard input closes, so it reads from a FIFO
# this shell holds open (and is stopped by its PID like everything else).
mkfifo "$work/endpoint.stdin"
python3 "$endpoint_py" --log "$work/token-requests.jsonl" --client-id "$CLIENT_ID" \
    --client-secret "$(cat "$work/client.secret")" --refresh-token "$refresh_token" \
    --expires-in "$EXPIRES_IN" --lifetime 86400 \
    <"$work/endpoint.stdin" >"$work/endpoint.log" 2>&1 &
pids+=($!); endpoint_pid=$!
exec 3>"$work/endpoint.stdin"
endpoint_up() { [ -s "$work/endpoint.log" ] && head -1 "$work/endpoint.log" | grep -qx '[0-9]*'; }
wait_for endpoint "$endpoint_pid" endpoint_up
endpoint_port=$(head -1 "$work/endpoint.log")

start_peer() {  # start_peer NAME PORT ARGUMENTS...
    local name=$1 port=$2; shift 2
    mkdir "$work/$name"
    python3 "$sink_py" "$port" "$work/$name" --cert "$work/cert.pem" --key "$work/key.pem" \
        --starttls --require-starttls "$@" >"$work/$name.log" 2>&1 &
    pids+=($!); pid_of[$name]=$!
    wait_for "$name" "$!" test -e "$work/$name/ready"
}
if has xoauth2 || has xoauth2_two; then
    start_peer peer-xoauth2 "$PEER_XOAUTH2_PORT" --auth XOAUTH2 --auth-required \
        --issued-tokens "$work/token-requests.jsonl" \
        --grants "{\"$ACCOUNT\": \"$refresh_token\", \"$ACCOUNT_A\": \"$refresh_token\", \"$ACCOUNT_B\": \"$refresh_token\"}"
fi
start_peer peer-plain "$PEER_PLAIN_PORT"

start_relay() {  # start_relay CONFIG
    local config=$1 port upstream_port auth=""
    port=$(ts_port "$config")
    case $config in
        plain) upstream_port=$PEER_PLAIN_PORT ;;
        xoauth2) upstream_port=$PEER_XOAUTH2_PORT
            auth="auth = \"xoauth2\"
oauth = \"bench\"
account = \"$ACCOUNT\"" ;;
        xoauth2_two) upstream_port=$PEER_XOAUTH2_PORT
            auth="auth = \"xoauth2\"
oauth = \"bench\"
account = \"$ACCOUNT_B\"

[[upstream.account_map]]
sender = \"a@bench.tsubame.test\"
account = \"$ACCOUNT_A\"" ;;
    esac
    cat >"$work/$config.toml" <<EOF
[server]
hostname = "relay.tsubame.test"

[[listener]]
address = "127.0.0.1:$port"

[spool]
directory = "$work/spool-$config"

[log]
level = "warn"

[[oauth]]
name = "bench"
kind = "refresh-token"
client_id = "$CLIENT_ID"
client_secret_file = "$work/client.secret"
token_directory = "$work/tokens"
token_endpoint = "http://127.0.0.1:$endpoint_port/token"

[delivery]
default_upstream = "peer"

[[upstream]]
name = "peer"
kind = "smtp"
host = "127.0.0.1"
port = $upstream_port
tls = "required"
ca_file = "$work/ca.pem"
$auth
EOF
    "$tsubame" serve --config "$work/$config.toml" >"$work/tsubame-$config.log" 2>&1 &
    pids+=($!); pid_of[$config]=$!
    wait_for "tsubame-$config" "$!" listening "$port"
}
for config in plain xoauth2 xoauth2_two; do
    if has "$config"; then start_relay "$config"; fi
done

# The bench command lines of one configuration, one per line.
benches() {  # benches CONFIG MESSAGES
    local config=$1 messages=$2
    local common="-s $SIZE --timeout 60 --quiet --to sink@peer.tsubame.test"
    case $config in
        plain | xoauth2)
            echo "$tsubame bench --target 127.0.0.1:$(ts_port "$config") -n $messages -c $SESSIONS --per-connection 1 $common" ;;
        xoauth2_two)
            local half=$((messages / 2)) sender
            for sender in a@bench.tsubame.test b@bench.tsubame.test; do
                echo "$tsubame bench --target 127.0.0.1:$(ts_port "$config") -n $half -c $((SESSIONS / 2)) --per-connection 1 --from $sender $common"
            done ;;
        ceiling)
            echo "$tsubame bench --target 127.0.0.1:$PEER_PLAIN_PORT --starttls -n $messages -c $POOL_CONNECTIONS --per-connection $POOL_MESSAGES $common" ;;
    esac
}
peer_of() { case $1 in xoauth2 | xoauth2_two) echo peer-xoauth2 ;; *) echo peer-plain ;; esac; }
messages_of() { if [ "$1" = xoauth2_two ]; then echo $(($2 / 2 * 2)); else echo "$2"; fi; }

one() {  # one CONFIG MESSAGES LABEL [TIMEOUT]
    local config=$1 messages peer arguments=() command
    messages=$(messages_of "$config" "$2")
    peer=$(peer_of "$config")
    while IFS= read -r command; do arguments+=(--bench "$command"); done < <(benches "$config" "$messages")
    "$run_py" --peer-dir "$work/$peer" --peer-pid "${pid_of[$peer]}" \
        --relay-pid "${pid_of[$config]:-0}" --token-log "$work/token-requests.jsonl" \
        --messages "$messages" --timeout "${4:-$TIMEOUT}" --quiet-wait "$QUIET_WAIT" \
        "${arguments[@]}" "config=$config" "$3"
}

# Warm-up, each configuration: connections, the first token of each account, page cache.
read -r -a configs <<<"$CONFIGS"
for config in "${configs[@]}"; do
    if ! line=$(one "$config" 1000 warmup=1 30 2>&1); then
        echo "warm-up of $config failed: $line" >&2
        cat "$work/tsubame-$config.log" >&2 2>/dev/null || true
        exit 1
    fi
done

for rep in $(seq "$REPS"); do
    order=("${configs[@]}")
    if [ $((rep % 2)) -eq 0 ]; then  # reverse order on even repetitions
        order=(); for ((i = ${#configs[@]} - 1; i >= 0; i--)); do order+=("${configs[i]}"); done
    fi
    for config in "${order[@]}"; do
        sleep 1
        one "$config" "$MSGS" "rep=$rep" | tee -a "$OUT" || true
    done
done
echo "raw results: $OUT"
"$run_py" --summarize "$OUT" || true
echo "Tokens lived $EXPIRES_IN s: the relay's cache refreshes one at half its life, so at most one" \
    "refresh per $((EXPIRES_IN / 2)) s of delivery per account, plus one at the start of a run" \
    "whose token went stale while the other configurations ran."

# The relays' own count of refreshes per account (oauth-status.json, written every 5 s),
# against the endpoint's, warm-ups included.
sleep 6
echo
echo "Refreshes over the whole script, warm-ups included: token endpoint $(grep -c '"ok": true' "$work/token-requests.jsonl" || true);" \
    "tsubame's oauth-status.json:"
for config in xoauth2 xoauth2_two; do
    [ -e "$work/spool-$config/oauth-status.json" ] || continue
    python3 - "$config" "$work/spool-$config/oauth-status.json" <<'EOF'
import json, sys
status = json.load(open(sys.argv[2]))
for account in status["accounts"]:
    print(f"  {sys.argv[1]}: {account['account']}: refresh_count={account['refresh_count']}"
          f" consecutive_failures={account['consecutive_failures']} last_error={account['last_error']}")
EOF
done
errors=$(grep -hiE 'warn|error' "$work"/tsubame-*.log | grep -v 'access token refreshed' | head -5 || true)
[ -z "$errors" ] || { echo "tsubame logged (first 5):"; echo "$errors"; }
