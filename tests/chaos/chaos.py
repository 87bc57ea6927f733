#!/usr/bin/env python3
"""The chaos run: tsubame under load while everything around it fails.

For --duration seconds, client threads send uniquely numbered messages (Python's
smtplib) to tsubame, which relays them to an upstream (aiosmtpd, in this process) while:

  * tsubame is killed with SIGKILL at random times and started again on the same spool;
  * the upstream flaps between accepting, answering 451, hanging past tsubame's timeout,
    and dropping the connection;
  * the spool's file system (a tmpfs of --spool-mib MiB this script mounts: needs root)
    fills up (a filler file takes every free byte) and frees again.

Then the faults stop, the upstream accepts, and tsubame gets --drain seconds to deliver
its queue. The verdict, by message number: every message that got a 250 must have
reached the upstream, with the body it was sent with. Duplicates (allowed: a kill
between the upstream's 250 and the journal record) are counted, and so is tsubame's
peak memory (VmHWM over every instance). The last line is JSON; exit 1 when a
message was lost or damaged, or fewer kills or disk-full episodes happened than
--min-kills and --min-disk-full ask.

  tests/chaos/chaos.py --tsubame target/release/tsubame --duration 300 --min-kills 20 \\
      --min-disk-full 10
"""

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time

from aiosmtpd.controller import Controller

ID_HEADER = re.compile(rb"^X-Chaos-Id: (\d+)\r?$", re.MULTILINE)
MODES = ["accept", "tempfail", "hang", "drop"]
MODE_WEIGHTS = [0.45, 0.2, 0.15, 0.2]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def body_of(number):
    """The body message `number` is sent with; the upstream checks it."""
    line = f"chaos message {number} " + "x" * 40 + "\r\n"
    return line * (1 + number % 40)


def message_of(number):
    return (
        f"From: chaos@example.com\r\nTo: sink@example.net\r\n"
        f"Subject: chaos {number}\r\nX-Chaos-Id: {number}\r\n"
        f"Message-ID: <chaos-{number}@chaos.tsubame.test>\r\n\r\n" + body_of(number)
    )


class Upstream:
    """aiosmtpd handler whose answer to each message depends on the current mode."""

    def __init__(self, hang_secs):
        self.mode = "accept"
        self.hang_secs = hang_secs
        self.lock = threading.Lock()
        self.received = collections.Counter()
        self.damaged = set()
        self.answers = collections.Counter()

    async def handle_DATA(self, server, session, envelope):
        mode = self.mode
        self.answers[mode] += 1
        if mode == "tempfail":
            return "451 4.3.0 chaos: try again later"
        if mode == "hang":
            await asyncio.sleep(self.hang_secs)
            return "451 4.4.2 chaos: hung"
        if mode == "drop":
            server.transport.close()
            return "421 4.3.0 chaos: dropped"
        content = envelope.original_content or envelope.content
        found = ID_HEADER.search(content)
        if found is None:
            # A bounce or something else: not one of ours.
            return "250 2.0.0 OK"
        number = int(found.group(1))
        body = content.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in content else b""
        with self.lock:
            self.received[number] += 1
            if body != body_of(number).encode():
                self.damaged.add(number)
        return "250 2.0.0 OK"


class Relay:
    """The tsubame process: started, killed, started again; memory sampled."""

    def __init__(self, binary, config, log_path):
        self.binary = binary
        self.config = config
        self.log_path = log_path
        self.process = None
        self.peak_kib = 0
        self.instances = 0
        self.sampler = None

    def start(self, timeout=60):
        log = open(self.log_path, "ab")
        marker = f"--- instance {self.instances + 1} ---\n".encode()
        log.write(marker)
        log.flush()
        self.process = subprocess.Popen(
            [self.binary, "serve", "--config", self.config],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, "RUST_LOG": "warn,tsubame::serve=info,tsubame_server=info"},
        )
        log.close()
        self.instances += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as text:
                tail = text.read().rsplit(marker, 1)[-1]
            if b"listening" in tail:
                return
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tsubame exited with {self.process.returncode} at start:\n{tail.decode(errors='replace')}"
                )
            time.sleep(0.05)
        raise RuntimeError("tsubame did not log 'listening' in time")

    def sample(self):
        if self.process is None or self.process.poll() is not None:
            return
        try:
            with open(f"/proc/{self.process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
        except OSError:
            pass

    def kill(self):
        self.sample()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.sample()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Load:
    """Client threads sending numbered messages at about `rate` per second in all."""

    def __init__(self, port, threads, rate):
        self.port = port
        self.threads = threads
        self.interval = threads / rate
        self.next_number = 0
        self.lock = threading.Lock()
        self.acked = set()
        self.refused = collections.Counter()
        self.stopping = threading.Event()
        self.workers = []

    def number(self):
        with self.lock:
            self.next_number += 1
            return self.next_number

    def run(self):
        while not self.stopping.is_set():
            started = time.monotonic()
            number = self.number()
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                    client.sendmail("chaos@example.com", ["sink@example.net"], message_of(number))
                with self.lock:
                    self.acked.add(number)
            except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused) as error:
                code = getattr(error, "smtp_code", None) or "rcpt"
                self.refused[f"reply {code}"] += 1
            except (OSError, smtplib.SMTPException) as error:
                self.refused[type(error).__name__] += 1
            left = self.interval - (time.monotonic() - started)
            if left > 0:
                self.stopping.wait(left)

    def start(self):
        for _ in range(self.threads):
            worker = threading.Thread(target=self.run, daemon=True)
            worker.start()
            self.workers.append(worker)

    def stop(self):
        self.stopping.set()
        for worker in self.workers:
            worker.join(timeout=30)


def fill(path):
    """Writes zeros to `path` until the file system is full."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(chunk)
        except OSError:
            pass
        # Smaller pieces take the last bytes too.
        small = b"\0" * 4096
        try:
            while True:
                filler.write(small)
        except OSError:
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tsubame", default="target/release/tsubame")
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--rate", type=float, default=150, help="messages per second offered")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--kill-every", type=float, nargs=2, default=[4, 14], metavar=("MIN", "MAX"))
    parser.add_argument("--disk-full-every", type=float, nargs=2, default=[15, 30], metavar=("MIN", "MAX"))
    parser.add_argument("--disk-full-secs", type=float, nargs=2, default=[2, 5], metavar=("MIN", "MAX"))
    parser.add_argument("--flap-every", type=float, nargs=2, default=[1, 4], metavar=("MIN", "MAX"))
    parser.add_argument("--spool-mib", type=int, default=64)
    parser.add_argument("--drain", type=float, default=300, help="seconds to deliver the queue at the end")
    parser.add_argument("--min-kills", type=int, default=0)
    parser.add_argument("--min-disk-full", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    chance = random.Random(seed)
    if os.geteuid() != 0:
        sys.exit("chaos.py: needs root to mount the spool's tmpfs (CI runs as root)")

    work = tempfile.mkdtemp(prefix="tsubame-chaos-")
    mount = os.path.join(work, "fs")
    os.makedirs(mount)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={args.spool_mib}m,mode=0700", "tsubame-chaos", mount],
        check=True,
    )
    upstream_handler = Upstream(hang_secs=8)
    upstream_port = free_port()
    controller = Controller(upstream_handler, hostname="127.0.0.1", port=upstream_port)
    controller.start()
    port = free_port()
    config = os.path.join(work, "tsubame.toml")
    with open(config, "w") as out:
        out.write(
            f"""[server]
hostname = "chaos.tsubame.test"
[[listener]]
address = "127.0.0.1:{port}"
relay_networks = ["127.0.0.0/8"]
[spool]
directory = "{mount}/spool"
segment_size_bytes = 1048576
[delivery_log]
path = "{work}/delivery.log"
[delivery]
default_upstream = "chaos"
retry_schedule_secs = [1]
shutdown_timeout_secs = 2
[[upstream]]
name = "chaos"
kind = "smtp"
host = "127.0.0.1"
port = {upstream_port}
tls = "none"
timeout_secs = 3
"""
        )
    relay = Relay(args.tsubame, config, os.path.join(work, "tsubame.log"))
    load = Load(port, args.threads, args.rate)
    kills = disk_full = flaps = 0
    filler = os.path.join(mount, "filler")
    report = {}
    try:
        relay.start()
        load.start()
        started = time.monotonic()
        end = started + args.duration
        next_kill = started + chance.uniform(*args.kill_every)
        next_full = started + chance.uniform(*args.disk_full_every)
        next_flap = started + chance.uniform(*args.flap_every)
        free_at = None
        while time.monotonic() < end:
            now = time.monotonic()
            relay.sample()
            if now >= next_kill:
                relay.kill()
                kills += 1
                time.sleep(chance.uniform(0, 1))
                relay.start()
                next_kill = time.monotonic() + chance.uniform(*args.kill_every)
            if free_at is None and now >= next_full:
                fill(filler)
                disk_full += 1
                free_at = now + chance.uniform(*args.disk_full_secs)
            if free_at is not None and now >= free_at:
                os.remove(filler)
                free_at = None
                next_full = time.monotonic() + chance.uniform(*args.disk_full_every)
            if now >= next_flap:
                upstream_handler.mode = chance.choices(MODES, MODE_WEIGHTS)[0]
                flaps += 1
                next_flap = now + chance.uniform(*args.flap_every)
            time.sleep(0.05)
        load.stop()
        if os.path.exists(filler):
            os.remove(filler)
        upstream_handler.mode = "accept"
        if relay.process.poll() is not None:
            relay.start()
        # Drain: every acknowledged message reaches the upstream, or the time is up.
        drain_end = time.monotonic() + args.drain
        while time.monotonic() < drain_end:
            relay.sample()
            with upstream_handler.lock:
                missing = [n for n in load.acked if upstream_handler.received[n] == 0]
            if not missing:
                break
            time.sleep(0.5)
        drain_secs = args.drain - max(0.0, drain_end - time.monotonic())
        relay.stop()
        with upstream_handler.lock:
            lost = sorted(n for n in load.acked if upstream_handler.received[n] == 0)
            duplicates = sum(count - 1 for count in upstream_handler.received.values() if count > 1)
            unacked_delivered = sum(1 for n in upstream_handler.received if n not in load.acked)
            damaged = sorted(upstream_handler.damaged)
        report = {
            "seed": seed,
            "duration_s": args.duration,
            "sent": load.next_number,
            "acknowledged": len(load.acked),
            "delivered_unique": len(upstream_handler.received),
            "lost": len(lost),
            "lost_first": lost[:20],
            "damaged": len(damaged),
            "duplicates": duplicates,
            "delivered_without_250": unacked_delivered,
            "kills": kills,
            "disk_full_episodes": disk_full,
            "upstream_flaps": flaps,
            "upstream_answers": dict(upstream_handler.answers),
            "client_refusals": dict(load.refused),
            "instances": relay.instances,
            "peak_rss_mib": round(relay.peak_kib / 1024, 1),
            "drain_s": round(drain_secs, 1),
        }
    finally:
        load.stopping.set()
        relay.stop()
        controller.stop()
        subprocess.run(["umount", mount], check=False)
        if args.keep or not report or report.get("lost") or report.get("damaged"):
            print(f"chaos.py: logs kept in {work}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", work], check=False)
    print(
        f"sent={report['sent']} acknowledged={report['acknowledged']} lost={report['lost']} "
        f"damaged={report['damaged']} duplicates={report['duplicates']} kills={report['kills']} "
        f"disk_full={report['disk_full_episodes']} flaps={report['upstream_flaps']} "
        f"peak_rss_mib={report['peak_rss_mib']} drain_s={report['drain_s']}"
    )
    print(json.dumps(report))
    failed = []
    if report["lost"]:
        failed.append(f"{report['lost']} acknowledged messages lost")
    if report["damaged"]:
        failed.append(f"{report['damaged']} messages damaged")
    if kills < args.min_kills:
        failed.append(f"only {kills} kills, {args.min_kills} asked")
    if disk_full < args.min_disk_full:
        failed.append(f"only {disk_full} disk-full episodes, {args.min_disk_full} asked")
    if report["acknowledged"] == 0:
        failed.append("no message was acknowledged: the run tested nothing")
    if failed:
        print("chaos.py: FAILED: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
