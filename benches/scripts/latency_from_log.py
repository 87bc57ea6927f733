#!/usr/bin/env python3
"""Accept-to-delivered latency from a tsubame log (text format, level info).

Pairs each `message accepted id=X` line with the `delivered id=X` line of the same
message and prints `messages=N p50_ms=… p90_ms=… p99_ms=… max_ms=…` (the time between
the 250 to the client, logged when the message is durable, and the upstream's 250).
"""

import re
import sys
from datetime import datetime

LINE = re.compile(r"^(\S+Z)\s+INFO\s+\S+\s+(message accepted|delivered) id=([0-9a-f]{16})")


def parse_time(text):
    # 2026-11-26T09:03:37.585042Z; Python 3.11 reads up to microseconds.
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def main():
    accepted, latencies = {}, []
    with open(sys.argv[1], encoding="utf-8", errors="replace") as log:
        for line in log:
            match = LINE.match(line)
            if not match:
                continue
            when, what, message = parse_time(match.group(1)), match.group(2), match.group(3)
            if what == "message accepted":
                accepted[message] = when
            elif message in accepted:
                latencies.append((when - accepted.pop(message)).total_seconds() * 1000.0)
    if not latencies:
        sys.exit("no accepted/delivered pairs in the log (is the level info?)")
    latencies.sort()

    def percentile(fraction):
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))]

    print(
        "messages=%d undelivered=%d p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f"
        % (
            len(latencies),
            len(accepted),
            percentile(0.50),
            percentile(0.90),
            percentile(0.99),
            latencies[-1],
        )
    )


if __name__ == "__main__":
    main()
