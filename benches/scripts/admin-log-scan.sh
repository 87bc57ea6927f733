#!/usr/bin/env bash
# What the admin server's log endpoints take on a large delivery log (README, "Admin
# HTTP"): writes EVENTS delivery events (about 400 bytes each) as a server's delivery.log,
# starts tsubame with the admin server on loopback, and times each request REPS times
# with curl; prints the median seconds and the bytes answered per request.
#
#   benches/scripts/admin-log-scan.sh            (EVENTS=400000 REPS=3)
#
# Everything runs on 127.0.0.1; the server is stopped by its PID.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
EVENTS=${EVENTS:-400000} REPS=${REPS:-3}
work=$(mktemp -d /tmp/tsubame-log-scan.XXXXXX)
pid=
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    [ -z "$pid" ] || wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

(cd "$repo" && cargo build --release -p tsubame)
mkdir -p "$work/spool"
python3 - "$work/spool/delivery.log" "$EVENTS" <<'PY'
import json, sys
path, count = sys.argv[1], int(sys.argv[2])
event = {"time": "2026-11-26T06:30:37.123Z", "event": "delivered", "id": "", "message_id": "<20261126063036.1@scanner.example.com>",
         "sender": "scanner@example.com", "recipient": "", "upstream": "relay", "remote": "smtp.example.net",
         "reply": "250 2.0.0 OK queued as 12345", "attempt": 1, "size_bytes": 48213,
         "tls": "TLSv1.3 TLS13_AES_256_GCM_SHA384", "since_received_ms": 412, "attempt_ms": 388}
with open(path, "w") as out:
    for number in range(count):
        event["id"] = f"{number:016x}"
        event["recipient"] = f"user{number}@example.net"
        out.write(json.dumps(event, separators=(",", ":")) + "\n")
PY
printf '[[listener]]\naddress = "127.0.0.1:0"\n[spool]\ndirectory = "%s/spool"\n[admin]\nenabled = true\naddress = "127.0.0.1:0"\n' \
    "$work" > "$work/tsubame.toml"
"$repo/target/release/tsubame" serve --config "$work/tsubame.toml" --hold > "$work/serve.log" 2>&1 &
pid=$!
address=
for _ in $(seq 100); do
    address=$(grep -o 'admin HTTP listening.*address=[0-9.:]*' "$work/serve.log" | grep -o '[0-9.]*:[0-9]*$' || true)
    [ -z "$address" ] || break
    sleep 0.1
done
[ -n "$address" ] || { echo "the admin server did not start; see $work/serve.log" >&2; exit 1; }
echo "log: $(du -h "$work/spool/delivery.log" | cut -f1), $EVENTS events"
last=$((EVENTS - 1))
for request in "/api/log?limit=100" "/api/log?address=user$last@" "/api/log.csv" "/metrics"; do
    times=() size=0
    for _ in $(seq "$REPS"); do
        read -r seconds size < <(curl -s -o /dev/null -w '%{time_total} %{size_download}\n' "http://$address$request")
        times+=("$seconds")
    done
    median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    printf '%-32s median %ss of %d, %s bytes\n' "$request" "$median" "$REPS" "$size"
done
