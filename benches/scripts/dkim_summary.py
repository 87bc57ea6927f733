#!/usr/bin/env python3
"""Summarize e2e-dkim-vs-postfix.sh's result lines (measure.py lines, plus milter_cpu_s for
Postfix+OpenDKIM) as markdown tables: per size, the median end-to-end and accept msgs/s
of each configuration, CPU per message (relay process tree, plus OpenDKIM's process when
there is one), then the ratios signed/unsigned per relay and tsubame signed / Postfix+OpenDKIM.
Ratios are ratios of medians. Runs whose status is not ok are listed and left out."""
import fileinput, statistics as st

ORDER = ["tsubame", "tsubame-dkim", "postfix", "postfix-dkim"]
NAMES = {"tsubame": "tsubame, unsigned", "tsubame-dkim": "tsubame, DKIM RSA-2048",
         "postfix": "Postfix, unsigned", "postfix-dkim": "Postfix + OpenDKIM, RSA-2048"}
runs = {}  # (size, label) -> [fields]
for line in fileinput.input():
    f = line.split()
    if not f or f[0].startswith("#"):
        continue
    kv = dict(x.split("=", 1) for x in f[1:] if "=" in x)
    if "msgs_per_s" not in kv:
        continue
    if kv["status"] != "ok":
        print("# not ok, left out:", line.strip())
        continue
    runs.setdefault((int(kv["size"]), f[0]), []).append(kv)


def med(rs, key):
    return st.median(float(r[key]) for r in rs)


def cpu_ms(r):  # CPU milliseconds per message: the relay's tree, plus the milter's process
    return (float(r["relay_cpu_s"]) + float(r.get("milter_cpu_s", 0))) * 1000 / float(r["msgs"])


for size in sorted({s for s, _ in runs}):
    here = {label: runs[(size, label)] for label in ORDER if (size, label) in runs}
    first = next(iter(here.values()))[0]
    print(f"\n### {size}-byte bodies, {first['sessions']} sessions, per_conn={first['per_conn']}, "
          f"{first['msgs']} messages per run\n")
    print("| configuration | runs | e2e msgs/s, median [min–max] | accept msgs/s, median | CPU ms/msg, median |")
    print("|---|---|---|---|---|")
    for label, rs in here.items():
        v = [float(r["msgs_per_s"]) for r in rs]
        cpu = st.median(cpu_ms(r) for r in rs)
        note = " (Postfix tree + opendkim)" if any("milter_cpu_s" in r for r in rs) else ""
        print(f"| {NAMES.get(label, label)} | {len(rs)} | {st.median(v):,.0f} [{min(v):,.0f}–{max(v):,.0f}] "
              f"| {med(rs, 'accept_per_s'):,.0f} | {cpu:.2f}{note} |")
    ratios = [("tsubame signed / tsubame unsigned", "tsubame-dkim", "tsubame"),
              ("Postfix+OpenDKIM / Postfix unsigned", "postfix-dkim", "postfix"),
              ("tsubame signed / Postfix+OpenDKIM (target ≥ 5×)", "tsubame-dkim", "postfix-dkim"),
              ("tsubame unsigned / Postfix unsigned", "tsubame", "postfix")]
    rows = [(name, med(here[x], "msgs_per_s") / med(here[y], "msgs_per_s"),
             st.median(cpu_ms(r) for r in here[x]) / st.median(cpu_ms(r) for r in here[y]))
            for name, x, y in ratios if x in here and y in here]
    if rows:
        print("\n| ratio (of medians) | e2e msgs/s | CPU per message |")
        print("|---|---|---|")
        for name, r, c in rows:
            print(f"| {name} | {r:.2f}× | {c:.2f}× |")
    # measure.py counts opendkim (not in the Postfix tree it was given) as "other" CPU.
    other = st.median(float(r["other_cpu_s"]) - float(r.get("milter_cpu_s", 0)) for rs in here.values() for r in rs)
    busy = st.median(float(r["idle_wait_bg"]) for rs in here.values() for r in rs)
    print(f"\nNoise: median CPU seconds used by other processes per run {other:.2f} (opendkim not counted "
          f"there); median cores busy just before a run {busy:.2f} (measure.py waits up to --quiet-wait "
          f"for < 0.3)")
