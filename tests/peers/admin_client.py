#!/usr/bin/env python3
"""HTTP client for the admin server tests: Python's urllib makes the requests, the
prometheus_client package parses /metrics, the csv module parses CSV.

Job (JSON on stdin): {"requests": [{"method": "GET", "url": "...", "headers": {...},
"parse": "json" | "prometheus" | "csv" | "text"}, ...]}
Output (JSON on stdout): one result per request: {"status": N, "headers": {lower-case name: value},
"body": <parsed>} where "prometheus" gives [[name, labels, value], ...] (every sample)
and "csv" gives a list of rows (lists of strings), the header row first.
"""

import csv
import io
import json
import sys
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def parse(kind, text):
    if kind == "json":
        try:
            return json.loads(text)
        except ValueError:
            return {"unparsed": text}
    if kind == "prometheus":
        samples = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.append([sample.name, sample.labels, sample.value])
        return samples
    if kind == "csv":
        # newline="" keeps the CRLF record ends for the csv module (RFC 4180).
        return list(csv.reader(io.StringIO(text, newline="")))
    return text


def run(request):
    data = request.get("body")
    http_request = urllib.request.Request(
        request["url"],
        method=request.get("method", "GET"),
        headers=request.get("headers", {}),
        data=data.encode() if data is not None else None,
    )
    try:
        with urllib.request.urlopen(http_request, timeout=20) as response:
            status = response.status
            headers = {name.lower(): value for name, value in response.headers.items()}
            raw = response.read()
    except urllib.error.HTTPError as error:
        status = error.code
        headers = {name.lower(): value for name, value in error.headers.items()}
        raw = error.read()
    text = raw.decode("utf-8")
    kind = request.get("parse", "text") if status == 200 else "json"
    return {"status": status, "headers": headers, "body": parse(kind, text), "raw": text}


def main():
    job = json.load(sys.stdin)
    json.dump([run(request) for request in job["requests"]], sys.stdout)


if __name__ == "__main__":
    main()
