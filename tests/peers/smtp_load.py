#!/usr/bin/env python3
"""Concurrent smtplib senders for the crash-safety test.

Reads a JSON job on standard input:

    {"host": "127.0.0.1", "port": 2525, "connections": 4,
     "messages_per_connection": 1000, "tag": "cycle1", "max_seconds": 60}

Each connection is one thread that sends messages one after another on one smtplib
session until it has sent its share, the time is up, or the server goes away (the test
kills it). For every message the server answered 250, one JSON line is written and
flushed at once:

    {"key": "...", "queued_as": "0123456789abcdef", "message_hex": "..."}

`message_hex` is the content exactly as the server must store it: these messages use
CRLF line endings only, so storing means undoing smtplib's dot-stuffing, which gives
back what was handed to smtplib. A thread that stops writes {"thread_done": n,
"sent": n, "error": str or null}. The acknowledged lines are what the test checks
against the spool after the crash.
"""

import json
import random
import re
import smtplib
import sys
import threading
import time

QUEUED_AS = re.compile(rb"queued as ([0-9a-fA-F]{16})")
OUTPUT_LOCK = threading.Lock()


def emit(record):
    line = json.dumps(record)
    with OUTPUT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def message_for(key):
    """A unique message of varying size; some lines start with a dot."""
    generator = random.Random(key)
    lines = [
        f"Message-Id: <{key}@load.tsubame.test>",
        f"Subject: load {key}",
        "From: load@tsubame.test",
        "To: sink@example.net",
        "",
    ]
    for number in range(generator.randint(1, 120)):
        width = generator.randint(0, 90)
        text = "".join(
            generator.choice("abcdefghijklmnopqrstuvwxyz0123456789 .") for _ in range(width)
        )
        if number % 17 == 3:
            text = "." + text
        lines.append(text)
    lines.append(f"end of {key}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def sender(job, index, deadline):
    sent = 0
    error = None
    try:
        client = smtplib.SMTP(job["host"], job["port"], local_hostname="load.tsubame.test", timeout=30)
        client.ehlo()
        for sequence in range(job["messages_per_connection"]):
            if time.monotonic() > deadline:
                break
            key = f"{job['tag']}-{index}-{sequence}"
            message = message_for(key)
            code, text = client.mail(f"load-{index}@tsubame.test")
            if code != 250:
                raise RuntimeError(f"MAIL answered {code} {text!r}")
            code, text = client.rcpt(f"sink-{sequence % 3}@example.net")
            if code != 250:
                raise RuntimeError(f"RCPT answered {code} {text!r}")
            code, text = client.data(message)
            if code != 250:
                raise RuntimeError(f"DATA answered {code} {text!r}")
            found = QUEUED_AS.search(text)
            if not found:
                raise RuntimeError(f"250 without a queued-as id: {text!r}")
            emit({
                "key": key,
                "queued_as": found.group(1).decode("ascii").lower(),
                "from": f"load-{index}@tsubame.test",
                "to": f"sink-{sequence % 3}@example.net",
                "message_hex": message.hex(),
            })
            sent += 1
        client.quit()
    except Exception as caught:  # the server being killed ends a sender in many ways
        error = f"{type(caught).__name__}: {caught}"
    emit({"thread_done": index, "sent": sent, "error": error})


def main():
    job = json.load(sys.stdin)
    deadline = time.monotonic() + job.get("max_seconds", 60)
    threads = [
        threading.Thread(target=sender, args=(job, index, deadline), daemon=True)
        for index in range(job["connections"])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
