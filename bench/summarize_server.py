#!/usr/bin/env python3
"""Summarises the results.tsv of bench/server.sh (or bench/s3.sh, naming its three tools:
local, kura remote, peer remote): medians per tool and step, and kura's ratios."""
import csv
import statistics
import sys

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
LOCAL, KURA, PEER = sys.argv[2:5] if len(sys.argv) > 4 else ("kura-local", "kura-server", "restic-rclone")
med = {}
for tool in sorted({r["tool"] for r in rows}):
    for step in ("backup", "incremental", "restore"):
        sel = [r for r in rows if r["tool"] == tool and r["step"] == step]
        if sel:
            med[(tool, step)] = {k: statistics.median(float(r[k]) for r in sel)
                                 for k in ("wall_s", "cpu_s", "maxrss_kb", "server_cpu_s")}

print("Medians over rounds: client wall s / client CPU s / client peak RSS MiB / server CPU s")
print()
print(f"| step | {LOCAL} | {KURA} | {PEER} | {KURA}/{LOCAL} | {KURA}/{PEER} |")
print("|---|---|---|---|---|---|")
for step in ("backup", "incremental", "restore"):
    cells = []
    for tool in (LOCAL, KURA, PEER):
        m = med.get((tool, step))
        cells.append(f"{m['wall_s']:.2f} / {m['cpu_s']:.2f} / {m['maxrss_kb'] / 1024:.0f} / {m['server_cpu_s']:.2f}" if m else "-")
    ks, kl, rr = med.get((KURA, step)), med.get((LOCAL, step)), med.get((PEER, step))
    r1 = f"**{ks['wall_s'] / kl['wall_s']:.2f}**" if ks and kl else "-"
    r2 = f"**{ks['wall_s'] / rr['wall_s']:.2f}**" if ks and rr else "-"
    print(f"| {step} | {' | '.join(cells)} | {r1} | {r2} |")
