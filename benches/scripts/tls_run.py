#!/usr/bin/env python3
"""One run of tls-vs-postfix.sh, or the summary of many.

Run:      tls_run.py --server-pid PID [--quiet-wait S] [--timeout S] FIELD=VALUE... -- BENCH_COMMAND...
Summary:  tls_run.py --summarize FILE...

A run waits (bounded) for the machine to be quiet, reads the CPU time of the server's
process tree, runs BENCH_COMMAND (a `tsubame bench ... --quiet` command line), reads the
CPU time again, and prints one line: "tls", the FIELD=VALUE labels given (server=, load=,
security=), the bench's own report fields, then

  server_cpu_s     CPU seconds of the server's process tree during the run (utime+stime of
                   the server and its live descendants, plus what it reaped: the accounting of
                   ../shared/bench/measure.py)
  server_cpu_us_per_op  that, in microseconds per handshake or accepted message
  client_cpu_s     CPU seconds of the bench client
  other_cpu_s      CPU the machine spent on anything else during the run (noise; rerun if large)
  idle_wait_bg     busy cores seen just before the run (above 0.3 the quiet wait timed out)
  status           ok, or failed (bench exit code not 0) / timeout

The bench is stopped by its PID after --timeout seconds. The summary prints medians
[min-max] per configuration and the ratios STARTTLS/plain and tsubame/Postfix as markdown.
"""
import argparse
import os
import resource
import signal
import statistics as st
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def cpu_stat():  # busy seconds over all cores (as measure.py)
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4] - f[7]) / HZ


def tree_cpu(root):  # as measure.py's tree_cpu: utime+stime+cutime+cstime of root and descendants
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                s = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            f = s[s.rindex(")") + 2:].split()
            procs[int(d)] = (int(f[1]), sum(int(x) for x in f[11:15]))
    todo, total, seen = [root], 0, set()
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in seen:
            seen.add(pid)
            total += procs[pid][1]
            todo += [c for c, (pp, _) in procs.items() if pp == pid]
    return total / HZ


def children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(a, labels, command):
    if not os.path.isdir(f"/proc/{a.server_pid}"):
        sys.exit(f"tls_run: the server process {a.server_pid} is not running")
    started, bg = time.monotonic(), 0.0
    while True:  # bounded wait for a quiet machine: other jobs distort everything
        b0 = cpu_stat(); time.sleep(0.5); b1 = cpu_stat()
        bg = (b1 - b0) / 0.5
        if bg < 0.3 or time.monotonic() - started > a.quiet_wait:
            break
    machine0, server0, client0 = cpu_stat(), tree_cpu(a.server_pid), children_cpu()
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status = "ok"
    try:
        out, err = bench.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        os.kill(bench.pid, signal.SIGTERM)
        out, err = bench.communicate(timeout=10)
        status = "timeout"
    machine1, server1, client1 = cpu_stat(), tree_cpu(a.server_pid), children_cpu()
    if status == "ok" and bench.returncode != 0:
        status = "failed"
    report = out.decode().strip().splitlines()
    fields = dict(x.split("=", 1) for x in (report[-1].split() if report else []) if "=" in x)
    ops = int(fields.get("handshakes", fields.get("accepted", "0")))
    server_cpu, client_cpu = server1 - server0, client1 - client0
    other = max(0.0, (machine1 - machine0) - server_cpu - client_cpu)
    per_op = server_cpu * 1e6 / ops if ops else 0.0
    print(" ".join(["tls"] + labels + (report[-1].split() if report else []) + [
        f"server_cpu_s={server_cpu:.2f}", f"server_cpu_us_per_op={per_op:.0f}",
        f"client_cpu_s={client_cpu:.2f}", f"other_cpu_s={other:.2f}", f"idle_wait_bg={bg:.2f}",
        f"status={status}"]), flush=True)
    if status != "ok":
        print(f"# {' '.join(command)}: {err.decode().strip()[-500:]}", file=sys.stderr)
    return 0 if status == "ok" else 1


LOADS = {  # load label -> (what the throughput counts, its report key)
    "handshakes": ("handshakes/s (connect to QUIT)", "handshakes_per_s"),
    "per_conn_1": ("msgs/s, 1 message per connection", "msgs_per_s"),
    "per_conn_0": ("msgs/s, connections kept open", "msgs_per_s"),
}
NAMES = {"tsubame": "tsubame", "postfix": "Postfix", "plain": "plain", "starttls": "STARTTLS"}


def summarize(files):
    runs, bad = {}, []
    for name in files:
        for line in open(name):
            f = line.split()
            if not f or f[0] != "tls":
                continue
            kv = dict(x.split("=", 1) for x in f[1:] if "=" in x)
            if kv.get("status") != "ok":
                bad.append(line.strip()); continue
            runs.setdefault((kv["load"], kv["server"], kv["security"]), []).append(kv)
    for line in bad:
        print("# not ok:", line)

    def med(load, server, security, key):
        rs = runs.get((load, server, security))
        return st.median(float(r[key]) for r in rs) if rs else None

    def spread(load, server, security, key):
        rs = runs.get((load, server, security))
        if not rs:
            return "–"
        v = [float(r[key]) for r in rs]
        return f"{st.median(v):,.0f} [{min(v):,.0f}–{max(v):,.0f}]"

    def ratio(x, y, digits=2):
        return f"{x / y:.{digits}f}×" if x is not None and y else "–"

    def fmt(x):
        return f"{x:,.0f}" if x is not None else "–"

    loads = [l for l in LOADS if any(k[0] == l for k in runs)]
    servers = [s for s in ("tsubame", "postfix") if any(k[1] == s for k in runs)]
    n = max((len(v) for v in runs.values()), default=0)
    print(f"\nMedians of {n} runs [min–max]; CPU is the server's process tree per handshake or "
          "accepted message.\n")
    print("| load | server | plain | STARTTLS | STARTTLS / plain | server CPU µs/op plain | "
          "STARTTLS | CPU STARTTLS / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for load in loads:
        what, key = LOADS[load]
        for server in servers:
            plain, tls = med(load, server, "plain", key), med(load, server, "starttls", key)
            cp = med(load, server, "plain", "server_cpu_us_per_op")
            ct = med(load, server, "starttls", "server_cpu_us_per_op")
            print(f"| {what} | {NAMES[server]} | {spread(load, server, 'plain', key)} | "
                  f"{spread(load, server, 'starttls', key)} | {ratio(tls, plain)} | {fmt(cp)} | "
                  f"{fmt(ct)} | {ratio(ct, cp)} |")
    if len(servers) == 2:
        print("\n| load | security | tsubame | Postfix | tsubame / Postfix | CPU per op, "
              "tsubame / Postfix |")
        print("|---|---|---|---|---|---|")
        for load in loads:
            what, key = LOADS[load]
            for security in ("plain", "starttls"):
                t, p = med(load, "tsubame", security, key), med(load, "postfix", security, key)
                if t is None and p is None:
                    continue
                ct = med(load, "tsubame", security, "server_cpu_us_per_op")
                cp = med(load, "postfix", security, "server_cpu_us_per_op")
                print(f"| {what} | {NAMES[security]} | {fmt(t)} | {fmt(p)} | {ratio(t, p, 1)} | "
                      f"{'1/' + format(cp / ct, '.1f') if ct and cp else '–'} |")
    others = [float(r["other_cpu_s"]) for rs in runs.values() for r in rs]
    if others:
        print(f"\nNoise: median other_cpu_s per run {st.median(others):.2f} s (max {max(others):.2f}).")
    suites = sorted({r.get("tls", "none") for rs in runs.values() for r in rs} - {"none"})
    if suites:
        print(f"TLS negotiated: {', '.join(suites)}.")
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summarize", action="store_true", help="summarize result files instead of running")
    p.add_argument("--server-pid", type=int, help="the server's PID (Postfix: the master)")
    p.add_argument("--quiet-wait", type=float, default=20,
                   help="wait up to this many seconds for the machine to be idle before the run")
    p.add_argument("--timeout", type=float, default=300, help="stop the bench after this many seconds")
    p.add_argument("rest", nargs="*", help="FIELD=VALUE labels, then -- and the bench command; or files")
    argv = sys.argv[1:]
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    a = p.parse_args(argv)
    if a.summarize:
        return summarize(a.rest)
    if a.server_pid is None or not command:
        p.error("a run needs --server-pid and -- BENCH_COMMAND")
    return run(a, a.rest, command)


if __name__ == "__main__":
    sys.exit(main())
