#!/usr/bin/env python3
"""One run of oauth-vs-plain.sh, or the summary of many.

Run:      oauth_run.py --peer-dir DIR --peer-pid PID --token-log FILE --messages N
              [--relay-pid PID] [--quiet-wait S] [--timeout S] FIELD=VALUE...
              --bench 'COMMAND' [--bench 'COMMAND']...
Summary:  oauth_run.py --summarize FILE...

A run waits (bounded) for the machine to be quiet, reads the CPU time of the relay
(`tsubame serve`) and of the SMTP peer (aiosmtpd_sink.py), starts every --bench command at
once (`tsubame bench ... --quiet`, into the relay, or straight into the peer for its
ceiling), and waits until the peer has written the Nth message of the run (its files are
numbered from 1 for its whole life; the run starts after the highest number it finds).
Then it reads the CPU times again, counts what the token endpoint peer issued and what the
SMTP peer logged in auth.log during the run, deletes the run's message files (so that the
peer's directory is as small for every run) and prints one line: "oauth", the FIELD=VALUE
labels given (config=...), then

  msgs, received   messages sent, and messages the peer got in the run (more: duplicates)
  accept_s         the slowest bench's time until its last 250 (from its own report)
  e2e_s            from the bench's start until the peer had every message
  msgs_per_s       msgs / e2e_s
  relay_cpu_us_per_msg  the relay's CPU (utime+stime of the process, all threads, /proc)
                   per message; 0 without --relay-pid
  peer_cpu_us_per_msg   the same for the SMTP peer
  refreshes        successful /token answers of the token endpoint during the run
  token_errors     refused /token requests during the run (should be 0)
  auths            "accepted" lines in the peer's auth.log during the run: one per upstream
                   connection that logged in
  bad_auths        any other auth.log lines during the run (wrong, expired or malformed
                   tokens; should be 0)
  other_cpu_s      CPU the machine spent on anything else during the run (noise)
  idle_wait_bg     busy cores seen just before the run (above 0.3 the quiet wait timed out)
  status           ok, or failed (a bench exit code not 0), timeout, or duplicates

The summary prints medians [min-max] per configuration, the ratio XOAUTH2/plain, the
refresh figures and the peer's ceiling as markdown.
"""
import argparse
import json
import os
import re
import resource
import shlex
import signal
import statistics as st
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
# How often the peer's directory is looked at while waiting for the last message.
POLL_S = 0.02
# After the last message, how long to wait for a duplicate before calling the run done.
DUPLICATE_GRACE_S = 0.5
# The peer's per-message files and the file that carries its count across runs.
MESSAGE_FILE = re.compile(r"([0-9]+)\.(json|eml|json\.tmp)")
COUNT_FILE = "bench-count"


def cpu_stat():  # busy seconds over all cores (as ../shared/bench/measure.py)
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4] - f[7]) / HZ


def process_cpu(pid):  # utime+stime of every thread of the process, in seconds
    if not pid:
        return 0.0
    s = open(f"/proc/{pid}/stat").read()
    f = s[s.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / HZ


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def token_log_counts(path):
    ok = refused = 0
    try:
        with open(path) as log:
            for line in log:
                record = json.loads(line)
                if record.get("path") == "/token":
                    if record.get("ok"):
                        ok += 1
                    else:
                        refused += 1
    except FileNotFoundError:
        pass
    return ok, refused


def auth_log_counts(peer_dir):
    accepted = other = 0
    try:
        with open(os.path.join(peer_dir, "auth.log")) as log:
            for line in log:
                if " accepted" in line:
                    accepted += 1
                else:
                    other += 1
    except FileNotFoundError:
        pass
    return accepted, other


def peer_count(peer_dir):
    """The number of the peer's last message before this run."""
    try:
        count = int(open(os.path.join(peer_dir, COUNT_FILE)).read())
    except (OSError, ValueError):
        count = 0
    for name in os.listdir(peer_dir):
        m = MESSAGE_FILE.fullmatch(name)
        if m:
            count = max(count, int(m.group(1)))
    return count


def clean_peer(peer_dir, last):
    for name in os.listdir(peer_dir):
        if MESSAGE_FILE.fullmatch(name):
            os.remove(os.path.join(peer_dir, name))
    with open(os.path.join(peer_dir, COUNT_FILE), "w") as out:
        out.write(f"{last}\n")


def run(a, labels):
    for pid in (a.relay_pid, a.peer_pid):
        if pid and not os.path.isdir(f"/proc/{pid}"):
            sys.exit(f"oauth_run: process {pid} is not running")
    started, bg = time.monotonic(), 0.0
    while True:  # bounded wait for a quiet machine: other jobs distort everything
        b0 = cpu_stat(); time.sleep(0.5); b1 = cpu_stat()
        bg = (b1 - b0) / 0.5
        if bg < 0.3 or time.monotonic() - started > a.quiet_wait:
            break
    before = peer_count(a.peer_dir)
    target = os.path.join(a.peer_dir, f"{before + a.messages}.json")
    tokens0, auths0 = token_log_counts(a.token_log), auth_log_counts(a.peer_dir)
    machine0, relay0, peer0 = cpu_stat(), process_cpu(a.relay_pid), process_cpu(a.peer_pid)
    client0 = children_cpu()
    t0 = time.monotonic()
    benches = [subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE) for command in a.bench]
    status, e2e = "ok", None
    deadline = t0 + a.timeout
    while time.monotonic() < deadline:
        if os.path.exists(target):
            e2e = time.monotonic() - t0
            break
        if any(b.poll() not in (None, 0) for b in benches):
            status = "failed"
            break
        time.sleep(POLL_S)
    else:
        status = "timeout"
    machine1, relay1, peer1 = cpu_stat(), process_cpu(a.relay_pid), process_cpu(a.peer_pid)
    tokens1, auths1 = token_log_counts(a.token_log), auth_log_counts(a.peer_dir)
    reports, errors = [], []
    for b in benches:
        try:
            out, err = b.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(b.pid, signal.SIGTERM)
            out, err = b.communicate(timeout=10)
            status = "timeout"
        if b.returncode != 0 and status == "ok":
            status = "failed"
        lines = out.decode().strip().splitlines()
        reports.append(dict(x.split("=", 1) for x in (lines[-1].split() if lines else []) if "=" in x))
        errors.append(err.decode().strip()[-500:])
    client1 = children_cpu()
    time.sleep(DUPLICATE_GRACE_S)
    received = peer_count(a.peer_dir) - before
    if status == "ok" and received > a.messages:
        status = "duplicates"
    clean_peer(a.peer_dir, before + received)

    accept_s = max((float(r.get("elapsed_s", "nan")) for r in reports), default=float("nan"))
    relay_cpu, peer_cpu = relay1 - relay0, peer1 - peer0
    client_cpu = client1 - client0
    other = max(0.0, (machine1 - machine0) - relay_cpu - peer_cpu - client_cpu)
    refreshes, token_errors = tokens1[0] - tokens0[0], tokens1[1] - tokens0[1]
    auths, bad_auths = auths1[0] - auths0[0], auths1[1] - auths0[1]
    e2e_s = e2e if e2e is not None else float("nan")
    per_msg = lambda cpu: cpu * 1e6 / a.messages
    print(" ".join(["oauth"] + labels + [
        f"msgs={a.messages}", f"received={received}", f"accept_s={accept_s:.3f}",
        f"e2e_s={e2e_s:.3f}", f"msgs_per_s={a.messages / e2e_s:.0f}" if e2e else "msgs_per_s=nan",
        f"relay_cpu_s={relay_cpu:.2f}", f"relay_cpu_us_per_msg={per_msg(relay_cpu):.0f}",
        f"peer_cpu_s={peer_cpu:.2f}", f"peer_cpu_us_per_msg={per_msg(peer_cpu):.0f}",
        f"client_cpu_s={client_cpu:.2f}", f"refreshes={refreshes}", f"token_errors={token_errors}",
        f"auths={auths}", f"bad_auths={bad_auths}", f"other_cpu_s={other:.2f}",
        f"idle_wait_bg={bg:.2f}", f"status={status}"]), flush=True)
    if status != "ok":
        for command, err in zip(a.bench, errors):
            print(f"# {command}: {err}", file=sys.stderr)
    return 0 if status == "ok" else 1


NAMES = {
    "plain": "plain (STARTTLS, no AUTH)",
    "xoauth2": "XOAUTH2 (STARTTLS, AUTH XOAUTH2)",
    "xoauth2_two": "XOAUTH2, two accounts mapped by sender",
    "ceiling": "peer ceiling: `tsubame bench` → plain peer",
}


def summarize(files):
    runs, bad = {}, []
    for name in files:
        for line in open(name):
            f = line.split()
            if not f or f[0] != "oauth":
                continue
            kv = dict(x.split("=", 1) for x in f[1:] if "=" in x)
            if kv.get("status") != "ok":
                bad.append(line.strip()); continue
            runs.setdefault(kv["config"], []).append(kv)
    for line in bad:
        print("# not ok:", line)
    configs = [c for c in NAMES if c in runs]

    def values(config, key):
        return [float(r[key]) for r in runs.get(config, [])]

    def med(config, key):
        v = values(config, key)
        return st.median(v) if v else None

    def spread(config, key):
        v = values(config, key)
        return f"{st.median(v):,.0f} [{min(v):,.0f}–{max(v):,.0f}]" if v else "–"

    def ratio(x, y):
        return f"{x / y:.2f}×" if x is not None and y else "–"

    n = max((len(v) for v in runs.values()), default=0)
    print(f"\nMedians of {n} runs [min–max]. CPU: µs per message of the relay process "
          "(`tsubame serve`, accept and delivery) and of the SMTP peer.\n")
    print("| configuration | delivered msgs/s | tsubame CPU µs/msg | peer CPU µs/msg |")
    print("|---|---|---|---|")
    for config in configs:
        relay = "–" if config == "ceiling" else spread(config, "relay_cpu_us_per_msg")
        print(f"| {NAMES[config]} | {spread(config, 'msgs_per_s')} | {relay} | "
              f"{spread(config, 'peer_cpu_us_per_msg')} |")
    plain = med("plain", "msgs_per_s")
    if plain:
        print("\n| ratio | delivered msgs/s | tsubame CPU per message | peer CPU per message |")
        print("|---|---|---|---|")
        for config in ("xoauth2", "xoauth2_two"):
            if config in runs:
                print(f"| {NAMES[config].split(' (')[0]} / plain | "
                      f"{ratio(med(config, 'msgs_per_s'), plain)} | "
                      f"{ratio(med(config, 'relay_cpu_us_per_msg'), med('plain', 'relay_cpu_us_per_msg'))} | "
                      f"{ratio(med(config, 'peer_cpu_us_per_msg'), med('plain', 'peer_cpu_us_per_msg'))} |")
        ceiling = med("ceiling", "msgs_per_s")
        if ceiling:
            print(f"| plain / peer ceiling | {ratio(plain, ceiling)} | | |")

    oauth_configs = [c for c in ("xoauth2", "xoauth2_two") if c in runs]
    if oauth_configs:
        print("\nToken refreshes (the token endpoint's successful /token answers during the "
              "runs) and upstream logins (the peer's accepted AUTHs), all runs together:\n")
        print("| configuration | messages | refreshes | messages per refresh | "
              "delivery seconds per refresh | logins | messages per login | "
              "refused tokens or /token requests |")
        print("|---|---|---|---|---|---|---|---|")
        for config in oauth_configs:
            msgs = sum(values(config, "msgs"))
            refreshes = sum(values(config, "refreshes"))
            seconds = sum(values(config, "e2e_s"))
            auths = sum(values(config, "auths"))
            refused = sum(values(config, "bad_auths")) + sum(values(config, "token_errors"))
            per = lambda total, by: f"{total / by:,.0f}" if by else "–"
            print(f"| {NAMES[config]} | {msgs:,.0f} | {refreshes:,.0f} | {per(msgs, refreshes)} | "
                  f"{seconds / refreshes if refreshes else float('nan'):.1f} | {auths:,.0f} | "
                  f"{per(msgs, auths)} | {refused:,.0f} |")
        per_run = {c: [r["refreshes"] for r in runs[c]] for c in oauth_configs}
        print("\nRefreshes per run: " + "; ".join(f"{c} {', '.join(v)}" for c, v in per_run.items()))
    others = [float(r["other_cpu_s"]) for rs in runs.values() for r in rs]
    if others:
        print(f"Noise: median other_cpu_s per run {st.median(others):.2f} s (max {max(others):.2f}).")
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summarize", action="store_true", help="summarize result files instead of running")
    p.add_argument("--relay-pid", type=int, default=0, help="tsubame serve's PID (none: the ceiling)")
    p.add_argument("--peer-pid", type=int, help="the SMTP peer's PID")
    p.add_argument("--peer-dir", help="the SMTP peer's OUTDIR")
    p.add_argument("--token-log", help="the token endpoint peer's --log")
    p.add_argument("--messages", type=int, help="messages the benches send in all")
    p.add_argument("--bench", action="append", default=[], help="a bench command line (repeatable)")
    p.add_argument("--quiet-wait", type=float, default=20,
                   help="wait up to this many seconds for the machine to be idle before the run")
    p.add_argument("--timeout", type=float, default=300, help="give up after this many seconds")
    p.add_argument("rest", nargs="*", help="FIELD=VALUE labels; or result files")
    a = p.parse_args()
    if a.summarize:
        return summarize(a.rest)
    if not (a.peer_pid and a.peer_dir and a.token_log and a.messages and a.bench):
        p.error("a run needs --peer-pid, --peer-dir, --token-log, --messages and --bench")
    return run(a, a.rest)


if __name__ == "__main__":
    sys.exit(main())
