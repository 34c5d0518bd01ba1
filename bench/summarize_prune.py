#!/usr/bin/env python3
"""Summarises bench/prune.sh's results.tsv: forget+prune and check --read-data, kura beside restic."""
import csv
import statistics
import sys

rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))[1:]
get = {}
for r in rows:
    if len(r) == 6:
        get[(r[0], r[1])] = (float(r[2]), float(r[3]), int(r[4]) / 1024, int(r[5]) / 1e6)
    elif len(r) == 3:
        get[(r[0], r[1])] = r[2]


def line(label, k, other):
    a, b = get.get(k), get.get(other)
    if not a or not b:
        return
    print(f"| {label} | {a[0]:.2f} s / {a[2]:.0f} MiB | {b[0]:.2f} s / {b[2]:.0f} MiB | "
          f"**{a[0] / b[0]:.2f}** | **{a[2] / b[2]:.2f}** |")


backups = {t: [v[0] for (tool, step), v in get.items() if tool == t and step.startswith("backup-") and isinstance(v, tuple)]
           for t in ("kura", "restic")}
print("| step | kura (wall / peak RSS) | restic | wall ratio | RSS ratio |")
print("|---|---|---|---|---|")
if backups["kura"] and backups["restic"]:
    n = min(len(backups["kura"]), len(backups["restic"]))
    k, r = statistics.median(backups["kura"][1:n]), statistics.median(backups["restic"][1:n])
    print(f"| incremental backup (median of {n - 1}) | {k:.2f} s | {r:.2f} s | {k / r:.2f} | |")
line("forget + prune", ("kura", "forget-prune"), ("restic", "forget-prune"))
line("check --read-data", ("kura", "check-read-data"), ("restic", "check-read-data"))
for tool in ("kura", "restic"):
    fp = get.get((tool, "forget-prune"))
    last = get.get((tool, f"backup-{max(1, len(backups[tool]) and 30)}"))
    if fp:
        print(f"\n{tool}: repository after forget+prune {fp[3]:.0f} MB")
o = get.get(("kura", "open-only"))
if o:
    print(f"\nkura's floor (opening the repository: Argon2id key derivation): peak RSS {o[2]:.0f} MiB")
k = get.get(("kura", "check-read-data"))
c = get.get(("cat", "cat-kura-repo"))
d = get.get(("dd-direct", "dd-direct-kura-repo"))
if k and c:
    mb = c[3]
    print(f"\nkura check --read-data: {mb / k[0]:.0f} MB/s; cat (page cache) {mb / c[0]:.0f} MB/s "
          f"-> {c[0] / k[0]:.2f} of cat's speed")
if k and d:
    print(f"dd O_DIRECT (from disk): {d[3] / d[0]:.0f} MB/s -> kura check at {d[0] / k[0]:.2f} of the disk's speed")
if ("kura", "index-bytes") in get:
    idx = int(get[("kura", "index-bytes")]) / 2**20
    print(f"\nkura with {get.get(('kura', 'snapshots'))} snapshots, index {idx:.1f} MiB:")
    for step in ("prune-many", "check-many", "check-read-data-many"):
        v = get.get(("kura", step))
        if v:
            print(f"  {step}: {v[0]:.2f} s, peak RSS {v[2]:.0f} MiB")
