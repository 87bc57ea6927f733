#!/usr/bin/env bash
# DKIM signing cost of tsubame (benches/benches/dkim_sign.rs, criterion) beside the raw
# signature cost of `openssl speed`, on this machine in one run:
#
#   * openssl µs per RSA-2048 signature, tsubame µs per RSA-2048-signed 1 KiB message,
#     and their ratio (the target is <= 1.3: hashing, canonicalisation and building the
#     header field should cost under a third of the signature itself);
#   * the same for Ed25519;
#   * ring's bare signature (criterion group dkim_sign_primitive), which splits the ratio
#     into the crypto library's share (ring/openssl) and the DKIM work's (tsubame/ring);
#   * per-byte cost at 100 KiB: the whole signature's ns/byte, and the marginal ns/byte
#     between 1 KiB and 100 KiB (body hashing and canonicalisation alone).
#
#   benches/scripts/dkim-sign-vs-openssl.sh
#
# Env: SECONDS_PER_OPENSSL=3, BENCH_ARGS (passed to criterion, e.g. "--measurement-time 3").
# Needs openssl (the bench makes its RSA key with it), python3 and cargo.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SECONDS_PER_OPENSSL=${SECONDS_PER_OPENSSL:-3}
BENCH_ARGS=${BENCH_ARGS:-}
criterion=${CARGO_TARGET_DIR:-$repo/target}/criterion

# Prints the sign/s figure of `openssl speed ALGORITHM`. The data line's last columns
# line up with the header's labels counted from the right, whatever columns the openssl
# version adds (3.0: sign verify sign/s verify/s; 3.2+ adds encrypt/decrypt for RSA).
openssl_signs_per_second() {
    openssl speed -seconds "$SECONDS_PER_OPENSSL" "$1" 2>/dev/null | awk '
        /sign\/s/ { for (i = 1; i <= NF; i++) if ($i == "sign/s") back = NF - i; next }
        back != "" && NF > back { print $(NF - back); found = 1; exit }
        END { if (!found) exit 1 }'
}

# Prints the median of a criterion benchmark in ns, and its throughput in bytes (0 when
# it has none), from target/criterion/GROUP/BENCH/new/.
criterion_median() {
    python3 - "$criterion/$1/new" <<'EOF'
import json, sys
directory = sys.argv[1]
with open(directory + "/estimates.json") as estimates:
    median = json.load(estimates)["median"]["point_estimate"]
with open(directory + "/benchmark.json") as benchmark:
    throughput = json.load(benchmark).get("throughput") or {}
print(median, throughput.get("Bytes", 0))
EOF
}

echo "openssl speed: $(openssl version)"
# Both sides measure wall time: on a loaded machine the figures are noise, so say so.
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
rsa_signs=$(openssl_signs_per_second rsa2048)
ed_signs=$(openssl_signs_per_second ed25519)
# OpenSSL 3 signs RSA-2048 with AVX-512 IFMA where the CPU has it, and ring has no such
# path; the same figure with IFMA masked (bit 21 of CPUID leaf 7 EBX, the second word
# of OPENSSL_ia32cap) shows how much of the gap that is.
rsa_signs_no_ifma=0
if grep -qw avx512ifma /proc/cpuinfo; then
    rsa_signs_no_ifma=$(OPENSSL_ia32cap="~0x0:~0x200000" openssl_signs_per_second rsa2048)
fi
echo "openssl sign/s: rsa2048 $rsa_signs, rsa2048 without IFMA $rsa_signs_no_ifma (0: not run), ed25519 $ed_signs"

# BENCH_ARGS is split into words on purpose.
# shellcheck disable=SC2086
(cd "$repo" && cargo bench -p tsubame-benches --bench dkim_sign -- $BENCH_ARGS) >&2

read -r rsa_message_ns _ < <(criterion_median dkim_sign_message/rsa2048)
read -r ed_message_ns _ < <(criterion_median dkim_sign_message/ed25519)
read -r rsa_ring_ns _ < <(criterion_median dkim_sign_primitive/rsa2048)
read -r ed_ring_ns _ < <(criterion_median dkim_sign_primitive/ed25519)
read -r rsa_1k_ns rsa_1k_bytes < <(criterion_median dkim_sign/rsa2048/1KiB)
read -r rsa_100k_ns rsa_100k_bytes < <(criterion_median dkim_sign/rsa2048/100KiB)
read -r ed_1k_ns ed_1k_bytes < <(criterion_median dkim_sign/ed25519/1KiB)
read -r ed_100k_ns ed_100k_bytes < <(criterion_median dkim_sign/ed25519/100KiB)

awk -v rsa_signs="$rsa_signs" -v ed_signs="$ed_signs" -v rsa_signs_no_ifma="$rsa_signs_no_ifma" \
    -v rsa_message_ns="$rsa_message_ns" -v ed_message_ns="$ed_message_ns" \
    -v rsa_ring_ns="$rsa_ring_ns" -v ed_ring_ns="$ed_ring_ns" \
    -v rsa_1k_ns="$rsa_1k_ns" -v rsa_1k_bytes="$rsa_1k_bytes" \
    -v rsa_100k_ns="$rsa_100k_ns" -v rsa_100k_bytes="$rsa_100k_bytes" \
    -v ed_1k_ns="$ed_1k_ns" -v ed_1k_bytes="$ed_1k_bytes" \
    -v ed_100k_ns="$ed_100k_ns" -v ed_100k_bytes="$ed_100k_bytes" \
    -v load="$(cut -d' ' -f1-3 /proc/loadavg)" '
function row(name, signs, ring_ns, message_ns,    openssl_us, ring_us, tsubame_us, ratio) {
    openssl_us = 1e6 / signs
    ring_us = ring_ns / 1e3
    tsubame_us = message_ns / 1e3
    ratio = tsubame_us / openssl_us
    printf "%-8s openssl %7.1f us/signature  tsubame %7.1f us/1 KiB message  ratio %.2f (target <= 1.3: %s)\n",
        name, openssl_us, tsubame_us, ratio, ratio <= 1.3 ? "met" : "MISSED"
    printf "%-8s   ring alone %7.1f us/bare signature: ring/openssl %.2f, tsubame/ring %.2f\n",
        "", ring_us, ring_us / openssl_us, tsubame_us / ring_us
}
function bytes(name, small_ns, small_bytes, large_ns, large_bytes) {
    printf "%-8s at 100 KiB (%d bytes): %.2f ns/byte whole message, %.2f ns/byte marginal over 1 KiB\n",
        name, large_bytes, large_ns / large_bytes, (large_ns - small_ns) / (large_bytes - small_bytes)
}
BEGIN {
    printf "load average after: %s\n", load
    row("RSA-2048", rsa_signs, rsa_ring_ns, rsa_message_ns)
    if (rsa_signs_no_ifma > 0)
        printf "%-8s   openssl without AVX-512 IFMA %7.1f us/signature: tsubame/that %.2f\n",
            "", 1e6 / rsa_signs_no_ifma, rsa_message_ns / 1e3 / (1e6 / rsa_signs_no_ifma)
    row("Ed25519", ed_signs, ed_ring_ns, ed_message_ns)
    bytes("RSA-2048", rsa_1k_ns, rsa_1k_bytes, rsa_100k_ns, rsa_100k_bytes)
    bytes("Ed25519", ed_1k_ns, ed_1k_bytes, ed_100k_ns, ed_100k_bytes)
}'
