"""Summarise bench/run.sh results: medians per tool and step, and kura's ratios to the peers."""
import csv, statistics, sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
db_size = int(sys.argv[2])
by = defaultdict(list)
for r in rows:
    by[(r["tool"], r["step"])].append(r)
tools = [t for t in ("kura", "restic", "borg") if any(k[0] == t for k in by)]
steps = ["backup-linux", "rebackup-unchanged", "backup-incremental", "restore", "backup-db", "backup-db-v2"]

def med(tool, step, col):
    v = [float(r[col]) for r in by.get((tool, step), [])]
    return statistics.median(v) if v else None

def ratio(a, b):
    return "%.2f" % (a / b) if a is not None and b else "-"

print("\nmedians over rounds (wall s / cpu s / peak RSS MiB / repo MB)")
print("%-20s" % "step" + "".join("%-30s" % t for t in tools) + "".join("%-14s" % ("kura/" + t) for t in tools[1:]))
for s in steps:
    line = "%-20s" % s
    for t in tools:
        w, c, m, b = (med(t, s, k) for k in ("wall_s", "cpu_s", "maxrss_kb", "repo_bytes"))
        line += "%-30s" % ("-" if w is None else "%.2f / %.2f / %.0f / %.0f" % (w, c, m / 1024, b / 1e6))
    for t in tools[1:]:
        line += "%-14s" % ratio(med("kura", s, "wall_s"), med(t, s, "wall_s"))
    print(line)
print()
for t in tools:
    a, b = med(t, "backup-db", "repo_bytes"), med(t, "backup-db-v2", "repo_bytes")
    if a and b:
        print("%-8s db-v2 (1%% of rows updated) grew the repository by %.1f MB = %.0f%% of the file" % (t, (b - a) / 1e6, 100 * (b - a) / db_size))
for t in tools[1:]:
    rs = [ratio(med("kura", s, "maxrss_kb"), med(t, s, "maxrss_kb")) for s in steps]
    print("peak RSS kura/%s per step: %s" % (t, " ".join(rs)))
    print("repository size kura/%s after the linux backup: %s" % (t, ratio(med("kura", "backup-linux", "repo_bytes"), med(t, "backup-linux", "repo_bytes"))))
