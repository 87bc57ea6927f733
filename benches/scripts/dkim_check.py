#!/usr/bin/env python3
"""Check, before a DKIM benchmark, that a relay really signs (or really does not sign).

Starts an aiosmtpd sink on 127.0.0.1:SINK_PORT that keeps every message, sends COUNT
messages through the relay on 127.0.0.1:TARGET with smtp-source (the same envelope as
../shared/bench/measure.py: -f bench@source.test, so the From: header is
<bench@source.test>), waits (bounded) until the sink has them all, and checks them:

  --expect signed    every message has a DKIM-Signature with d=DOMAIN and s=SELECTOR, and,
                     when dkimpy is installed and --txt gives the DNS record, it verifies
                     against that key (no DNS: the lookup is answered here)
  --expect unsigned  no message has a DKIM-Signature

Prints one line saying what was found; exits 1 (with the reason and the first message's
header) when the check fails. --save DIR keeps the messages as DIR/N.eml.
"""
import argparse, os, re, subprocess, sys, threading, time

from aiosmtpd.controller import Controller

p = argparse.ArgumentParser()
p.add_argument("--label", required=True)
p.add_argument("--target", type=int, required=True, help="the relay's port on 127.0.0.1")
p.add_argument("--sink-port", type=int, required=True, help="where the relay delivers")
p.add_argument("--count", type=int, default=5)
p.add_argument("--size", type=int, default=1024, help="smtp-source -l")
p.add_argument("--expect", choices=["signed", "unsigned"], required=True)
p.add_argument("--domain", default="source.test")
p.add_argument("--selector", default="bench")
p.add_argument("--txt", help="the DKIM DNS record (v=DKIM1; k=rsa; p=...) to verify against")
p.add_argument("--timeout", type=float, default=60)
p.add_argument("--save", help="keep the messages here")
a = p.parse_args()
HOST = "127.0.0.1"

messages, lock = [], threading.Lock()


class Keep:
    async def handle_DATA(self, server, session, envelope):
        with lock:
            messages.append(envelope.original_content or envelope.content)
        return "250 2.0.0 kept"


sink = Controller(Keep(), hostname=HOST, port=a.sink_port, decode_data=False)
sink.start()
try:
    cmd = ["smtp-source", "-l", str(a.size), "-N", "-f", "bench@source.test", "-t", "rcpt@dest.test",
           "-s", "1", "-m", str(a.count), f"{HOST}:{a.target}"]
    try:
        src = subprocess.run(cmd, capture_output=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"{a.label}: smtp-source did not finish within {a.timeout:.0f} s")
    if src.returncode != 0:
        sys.exit(f"{a.label}: smtp-source rc={src.returncode}: {src.stderr.decode()[-500:].strip()}")
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        with lock:
            if len(messages) >= a.count:
                break
        time.sleep(0.05)
    time.sleep(0.3)  # late duplicates
finally:
    sink.stop()

if len(messages) < a.count:
    sys.exit(f"{a.label}: the sink got {len(messages)} of {a.count} messages within {a.timeout:.0f} s")
if a.save:
    os.makedirs(a.save, exist_ok=True)
    for i, m in enumerate(messages):
        with open(os.path.join(a.save, f"{i}.eml"), "wb") as fh:
            fh.write(m)


def header_block(m):
    return re.split(rb"\r?\n\r?\n", m, maxsplit=1)[0]


def signatures(m):  # the unfolded DKIM-Signature fields of one message
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", header_block(m))
    return [line for line in re.split(rb"\r?\n", unfolded) if line.lower().startswith(b"dkim-signature:")]


def tag(sig, name):
    m = re.search(rb"[:;]\s*" + name.encode() + rb"\s*=\s*([^;]*)", sig)
    return m.group(1).strip().decode() if m else None


def fail(why):
    print(f"{a.label}: {why}; first message's header:", file=sys.stderr)
    print(header_block(messages[0]).decode(errors="replace"), file=sys.stderr)
    sys.exit(1)


sigs = [signatures(m) for m in messages]
if a.expect == "unsigned":
    n = sum(1 for s in sigs if s)
    if n:
        fail(f"{n} of {len(messages)} messages carry a DKIM-Signature, none expected")
    print(f"{a.label}: {len(messages)} messages delivered, none signed (as expected)")
    sys.exit(0)

ours = [[s for s in ss if tag(s, "d") == a.domain and tag(s, "s") == a.selector] for ss in sigs]
missing = sum(1 for s in ours if not s)
if missing:
    fail(f"{missing} of {len(messages)} messages have no DKIM-Signature with d={a.domain} s={a.selector}")
first = ours[0][0]
detail = f"a={tag(first, 'a')} c={tag(first, 'c')} h={tag(first, 'h')}"

verified = "not verified (no --txt)"
if a.txt:
    try:
        import dkim
    except ImportError:
        verified = "not verified (dkimpy is not installed: pip install dkimpy)"
    else:
        name = f"{a.selector}._domainkey.{a.domain}."

        def dns(qname, timeout=5):  # dkimpy's dnsfunc: answer our one record, nothing else
            q = qname.decode() if isinstance(qname, bytes) else qname
            return a.txt.encode() if q.rstrip(".") == name.rstrip(".") else None

        bad = [i for i, m in enumerate(messages) if not dkim.verify(m, dnsfunc=dns)]
        if bad:
            fail(f"{len(bad)} of {len(messages)} signatures do not verify against the key (dkimpy)")
        verified = "all verify (dkimpy)"
print(f"{a.label}: {len(messages)} messages delivered, all signed d={a.domain} s={a.selector} {detail}; {verified}")
