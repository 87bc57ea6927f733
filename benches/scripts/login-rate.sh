#!/usr/bin/env bash
# Logins per second over STARTTLS, with and without the login cache ([auth]
# login_cache_secs): `tsubame bench --starttls --handshakes --auth USER` against
# `tsubame serve --hold` with one device account (argon2id, the default parameters) and a
# throwaway RSA 2048 certificate. Runs each configuration REPS times, interleaved.
#
#   benches/scripts/login-rate.sh
#
# Env: REPS=3 HANDSHAKES=2000 SESSIONS=50. Needs openssl. Everything runs on 127.0.0.1;
# every process started here is stopped by its PID. The password is made up for the run.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tsubame="$repo/target/release/tsubame"
REPS=${REPS:-3} HANDSHAKES=${HANDSHAKES:-2000} SESSIONS=${SESSIONS:-50}
work=$(mktemp -d /tmp/tsubame-logins.XXXXXX)
pid=
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/key.pem" -out "$work/cert.pem" \
    -days 1 -subj /CN=127.0.0.1 2>/dev/null
export TSUBAME_BENCH_PASSWORD="bench-$RANDOM-$RANDOM"
printf '%s\n' "$TSUBAME_BENCH_PASSWORD" |
    "$tsubame" user add bench --users-file "$work/users.toml" --password-stdin >/dev/null
config() {  # config NAME LOGIN_CACHE_SECS
    cat >"$work/$1.toml" <<TOML
[[listener]]
address = "127.0.0.1:2587"
certificate_file = "$work/cert.pem"
key_file = "$work/key.pem"
[auth]
users_file = "$work/users.toml"
login_cache_secs = $2
[spool]
directory = "$work/spool"
TOML
}
config no-cache 0
config cache 3600

run() {  # run NAME
    rm -rf "$work/spool"
    "$tsubame" serve --config "$work/$1.toml" --hold --log-level warn >"$work/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do
        "$tsubame" bench --target 127.0.0.1:2587 --starttls --handshakes -n 1 -c 1 --quiet \
            >/dev/null 2>&1 && break
        sleep 0.1
    done
    local report
    report=$("$tsubame" bench --target 127.0.0.1:2587 --starttls --handshakes --auth bench \
        -n "$HANDSHAKES" -c "$SESSIONS" --quiet)
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    echo "$1 $report"
}

for rep in $(seq "$REPS"); do
    if (( rep % 2 )); then run no-cache; run cache; else run cache; run no-cache; fi
done | tee "$work/results.txt"
echo
for name in no-cache cache; do
    grep "^$name " "$work/results.txt" | python3 -c '
import statistics, sys
rates = [float(f.split("=")[1]) for line in sys.stdin for f in line.split() if f.startswith("handshakes_per_s=")]
print(sys.argv[1], "logins_per_s median=%.0f [%.0f-%.0f]" % (statistics.median(rates), min(rates), max(rates)))
' "$name"
done
