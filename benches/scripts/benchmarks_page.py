#!/usr/bin/env python3
"""Writes BENCHMARKS.md and its plot from a benchmarks.sh results directory.

    benchmarks_page.py RESULTS_DIR BENCHMARKS_MD PLOT_PNG

Reads measure.py lines (e2e-sN.txt, accept-sN.txt), memory.txt, machine.txt, and the
summaries the DKIM and TLS scripts printed (dkim.out, tls.out). Every number on the page
comes from those files: medians over the repetitions, with min-max.
"""

import os
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def runs(path):
    """measure.py lines of one file: dicts with the label."""
    found = []
    if not os.path.exists(path):
        return found
    for line in open(path):
        fields = line.split()
        if not fields:
            continue
        values = dict(field.split("=", 1) for field in fields[1:] if "=" in field)
        if "msgs_per_s" in values and values.get("status") == "ok":
            values["label"] = fields[0]
            found.append(values)
    return found


def median_of(rows, key):
    values = [float(row[key]) for row in rows]
    return statistics.median(values), min(values), max(values)


def main():
    results, page, plot = sys.argv[1:4]
    # The results directory as the page names it: relative to the page when inside the
    # repository.
    shown = os.path.relpath(os.path.abspath(results), os.path.dirname(os.path.abspath(page)))
    if shown.startswith(".."):
        shown = os.path.abspath(results)
    machine = dict(
        line.rstrip("\n").split("=", 1) for line in open(os.path.join(results, "machine.txt")) if "=" in line
    )
    sessions_list = sorted(
        int(match.group(1))
        for name in os.listdir(results)
        if (match := re.fullmatch(r"e2e-s(\d+)\.txt", name))
    )
    table = {}  # (kind, sessions, size, relay) -> dict
    sizes = set()
    for kind in ("e2e", "accept"):
        for sessions in sessions_list:
            rows = runs(os.path.join(results, f"{kind}-s{sessions}.txt"))
            for size in {row["size"] for row in rows}:
                sizes.add(int(size))
                for relay in ("tsubame", "postfix"):
                    chosen = [row for row in rows if row["label"] == relay and row["size"] == size]
                    if not chosen:
                        continue
                    rate_key = "msgs_per_s" if kind == "e2e" else "accept_per_s"
                    rate = median_of(chosen, rate_key)
                    cpu_ms = statistics.median(
                        float(row["relay_cpu_s"]) * 1000 / float(row["msgs"]) for row in chosen
                    )
                    table[(kind, sessions, int(size), relay)] = {
                        "rate": rate,
                        "cpu_ms": cpu_ms,
                        "n": len(chosen),
                    }
    sizes = sorted(sizes)
    memory = []
    memory_path = os.path.join(results, "memory.txt")
    if os.path.exists(memory_path):
        for line in open(memory_path):
            values = dict(field.split("=", 1) for field in line.split()[1:] if "=" in field)
            memory.append(values)

    # The plot: msgs/s against sessions, a line per relay and size, e2e and accept.
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, kind, title in zip(axes, ("e2e", "accept"), ("End to end (relayed to a sink)", "Accept only (durable)")):
        for relay, style in (("tsubame", "-"), ("postfix", "--")):
            for size, marker in zip(sizes, "osd^v"):
                points = [
                    (sessions, table[(kind, sessions, size, relay)]["rate"][0])
                    for sessions in sessions_list
                    if (kind, sessions, size, relay) in table
                ]
                if points:
                    axis.plot(
                        [p[0] for p in points],
                        [p[1] for p in points],
                        style,
                        marker=marker,
                        label=f"{relay} {size // 1024} KiB",
                    )
        axis.set_xscale("log")
        axis.set_xticks(sessions_list)
        axis.set_xticklabels([str(s) for s in sessions_list])
        axis.set_xlabel("concurrent sessions (a connection per message)")
        axis.set_ylabel("messages per second (median)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    version = machine.get("tsubame", "?").split(" ")[0]
    figure.suptitle(f"tsubame {version} and Postfix {machine.get('postfix', '?')}, same machine, same run")
    figure.tight_layout()
    figure.savefig(plot, dpi=110)

    def cell(kind, sessions, size, relay):
        entry = table.get((kind, sessions, size, relay))
        if entry is None:
            return "–", "–"
        rate, low, high = entry["rate"]
        return f"{rate:,.0f} [{low:,.0f}–{high:,.0f}]", f"{entry['cpu_ms']:.2f}"

    lines = []
    out = lines.append
    out("# BENCHMARKS")
    out("")
    out("tsubame against Postfix on one machine, in one run, interleaved (each repetition runs")
    out("both, alternating which goes first). Regenerate the whole page, plot included, with")
    out("`benches/scripts/benchmarks.sh` (about half an hour on 2 cores). The raw lines of the run")
    out(f"shown here are in `{shown}/`; `benches/scripts/benchmarks_page.py`")
    out(f"rebuilds this page from them. Figures are medians of {machine.get('settings', '').split('REPS=')[1].split()[0] if 'REPS=' in machine.get('settings', '') else '?'} repetitions with [min–max];")
    out("the machine is shared and noisy, so read the ratios, not the absolute values.")
    out("")
    out(f"- machine: {machine.get('machine', '?')}; CPU: {machine.get('cpu', '?')}")
    out(f"- tsubame {machine.get('tsubame', '?')} (release build), Postfix {machine.get('postfix', '?')}, run {machine.get('date', '?')}")
    out(f"- settings: `{machine.get('settings', '?')}`")
    out("- load: Postfix's `smtp-source` (a connection per message) into the relay on 127.0.0.1; the")
    out("  relay delivers to `smtp-sink` (`../shared/bench/measure.py` counts every message there).")
    out("  Both relays are durable: tsubame syncs its spool (group commit) before each 250, Postfix")
    out("  fsyncs its queue file. Accept only: tsubame `serve --hold`, Postfix `defer_transports=smtp`.")
    out("- CPU per message: the relay's processes (utime + stime) over the run, divided by the messages.")
    out("")
    out("![msgs/s against concurrency](benches/throughput.png)")
    out("")
    out("With one session neither relay can share a sync between messages (each waits for its")
    out("own), so the ratio is smallest there; with more sessions tsubame's group commit covers")
    out("many messages per sync while Postfix syncs each queue file.")
    out("")
    for kind, heading in (("e2e", "End to end"), ("accept", "Accept only")):
        out(f"## {heading}")
        out("")
        out("| size | sessions | tsubame msgs/s | Postfix msgs/s | ratio | tsubame CPU ms/msg | Postfix CPU ms/msg |")
        out("|---|---|---|---|---|---|---|")
        for size in sizes:
            for sessions in sessions_list:
                ts_rate, ts_cpu = cell(kind, sessions, size, "tsubame")
                pf_rate, pf_cpu = cell(kind, sessions, size, "postfix")
                ts = table.get((kind, sessions, size, "tsubame"))
                pf = table.get((kind, sessions, size, "postfix"))
                ratio = f"{ts['rate'][0] / pf['rate'][0]:.1f}×" if ts and pf and pf["rate"][0] else "–"
                out(f"| {size // 1024} KiB | {sessions} | {ts_rate} | {pf_rate} | {ratio} | {ts_cpu} | {pf_cpu} |")
        out("")
    if memory:
        out("## Memory")
        out("")
        out("Each relay loaded end to end with 10 KiB messages at the highest concurrency; right")
        out("after the run, the proportional set size (PSS: shared pages divided among the processes")
        out("that share them, so the sum is the relay's real share) of all its processes, from")
        out("`/proc/PID/smaps_rollup`. tsubame's includes the pages of its spool segments it has")
        out("mapped. For tsubame also its peak resident set over the run (VmHWM).")
        out("")
        out("| relay | sessions | processes | PSS MiB | peak RSS MiB |")
        out("|---|---|---|---|---|")
        for values in memory:
            peak = values.get("peak_rss_kib")
            out(
                f"| {values['relay']} | {values['sessions']} | {values.get('processes', '1')} | "
                f"{int(values['pss_kib']) / 1024:.1f} | {int(peak) / 1024:.1f} |"
                if peak
                else f"| {values['relay']} | {values['sessions']} | {values.get('processes', '1')} | "
                f"{int(values['pss_kib']) / 1024:.1f} | – |"
            )
        out("")
    for name, heading, script, what in (
        (
            "dkim.out",
            "With DKIM (RSA-2048): tsubame against Postfix + OpenDKIM",
            "benches/scripts/e2e-dkim-vs-postfix.sh",
            "End to end as above, every signature checked with dkimpy before the runs.",
        ),
        (
            "tls.out",
            "With TLS: tsubame against Postfix",
            "benches/scripts/tls-vs-postfix.sh",
            "Accept only, STARTTLS against plain, with `tsubame bench` as the client for both "
            "(smtp-source has no TLS); a full handshake per connection.",
        ),
    ):
        path = os.path.join(results, name)
        if not os.path.exists(path):
            continue
        text = open(path).read()
        summary = text.split("raw results:", 1)[-1].split("\n", 1)[-1] if "raw results:" in text else text
        # postfix(1)'s own start and stop messages are not results.
        summary = "\n".join(
            line for line in summary.splitlines() if not line.startswith("postfix/postfix-script")
        ).strip()
        out(f"## {heading}")
        out("")
        out(f"From `{script}`, run by `benchmarks.sh` in the same session, with the same")
        out(f"repetitions and message count (its other settings as its header says). {what}")
        out("Its summary, as printed:")
        out("")
        out("```text")
        out(summary)
        out("```")
        out("")
    with open(page, "w") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
