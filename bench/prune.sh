#!/usr/bin/env bash
# Generations benchmark: N incremental snapshots of a changing Linux tree in kura and restic
# (same tree state each time), then forget + prune in both, then check --read-data beside the
# time to read the repository's bytes (cat from the page cache, and dd with O_DIRECT from disk).
# Then kura alone goes on to EXTRA more snapshots (50+ in all) and reports peak RSS of prune and
# check beside the size of its index. Not part of CI (~15 minutes).
#   N=30 EXTRA=45 BENCH_DIR=/tmp/kura-bench bench/prune.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
N=${N:-30}
EXTRA=${EXTRA:-45}
KEEP=${KEEP:-7}
need restic restic
prepare

W="$BENCH_DIR/prune"; rm -rf "$W"; mkdir -p "$W"
export RESTIC_PASSWORD=bench KURA_PASSWORD=bench RESTIC_CACHE_DIR="$W/restic-cache"
OUT="$W/results.tsv"
printf 'tool\tstep\twall_s\tcpu_s\tmaxrss_kb\trepo_bytes\n' >"$OUT"

measure() { # tool step repo cmd...
  local tool=$1 step=$2 repo=$3; shift 3
  /usr/bin/time -f '%e %U %S %M' -o "$W/time" "$@" >"$W/$tool-$step.log" 2>&1 || { echo "$tool $step failed: $(tail -3 "$W/$tool-$step.log")" >&2; return 1; }
  read -r wall user sys rss <"$W/time"
  printf '%s\t%s\t%s\t%.2f\t%s\t%s\n' "$tool" "$step" "$wall" "$(echo "$user + $sys" | bc)" "$rss" "$(du -sb "$repo" | cut -f1)" | tee -a "$OUT"
}

# A deterministic churn step: ~1% of files modified (a line appended, so their chunks change),
# ~0.3% deleted, ~0.3% new files of random text. Seeded by the round number.
churn() {
  python3 - "$W/tree" "$1" <<'PY'
import os, random, sys
root, r = sys.argv[1], int(sys.argv[2]); rnd = random.Random(1000 + r)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
rnd.shuffle(files)
n = len(files)
for p in files[: n // 100]:
    if not os.path.islink(p):
        with open(p, "ab") as f: f.write(b"/* round %d */\n" % r)
for p in files[n // 100 : n // 100 + n * 3 // 1000]:
    os.remove(p)
for i, p in enumerate(files[n // 50 : n // 50 + n * 3 // 1000]):
    if not os.path.islink(p):
        with open(p + ".r%d.%d" % (r, i), "wb") as f: f.write(rnd.randbytes(rnd.randint(200, 40000)).hex().encode())
PY
}

KR="$W/kura-repo"; RR="$W/restic-repo"
rm -rf "$W/tree"; cp -a "$BENCH_DIR/linux" "$W/tree"
"$KURA" -r "$KR" init -q
restic init -q --repository-version 2 -r "$RR"
cd "$W"
t=$(date +%s)
for i in $(seq "$N"); do
  [ "$i" -gt 1 ] && churn "$i"
  # One snapshot a day, so the policy below has days to choose from.
  day=$(date -u -d "@$((t - (N - i) * 86400))" +%Y-%m-%dT%H:%M:%SZ)
  measure kura "backup-$i" "$KR" "$KURA" -r "$KR" backup -q --host bench --time "$day" tree
  measure restic "backup-$i" "$RR" restic -q -r "$RR" backup --host bench --time "$(date -u -d "$day" '+%Y-%m-%d %H:%M:%S')" tree
done

# What opening a repository costs in memory (the Argon2id key derivation, 32 MiB), the floor
# of every kura command's peak RSS.
measure kura open-only "$KR" "$KURA" -r "$KR" snapshots -q

# Same policy in both: the last KEEP daily snapshots; 5% unused tolerated (restic's default).
measure kura forget-prune "$KR" "$KURA" -r "$KR" forget --keep-daily "$KEEP" --timezone UTC --prune --max-unused 5%
measure restic forget-prune "$RR" restic -r "$RR" forget --keep-daily "$KEEP" --prune --max-unused 5%

# check --read-data beside reading the same bytes.
find "$KR" -type f -print0 | xargs -0 cat >/dev/null   # warm
measure cat cat-kura-repo "$KR" sh -c "find '$KR' -type f -print0 | xargs -0 cat >/dev/null"
measure dd-direct dd-direct-kura-repo "$KR" sh -c "find '$KR' -type f -size +1M -print0 | xargs -0 -I{} dd if={} of=/dev/null bs=4M iflag=direct status=none"
measure kura check-read-data "$KR" "$KURA" -r "$KR" check --read-data
find "$RR" -type f -print0 | xargs -0 cat >/dev/null
measure cat cat-restic-repo "$RR" sh -c "find '$RR' -type f -print0 | xargs -0 cat >/dev/null"
measure restic check-read-data "$RR" restic -r "$RR" check --read-data

# 50+ snapshots: kura alone goes on, then prune and check once more; the index's size is the
# yardstick for their memory.
for i in $(seq "$((N + 1))" "$((N + EXTRA))"); do
  churn "$i"
  measure kura "backup-$i" "$KR" "$KURA" -r "$KR" backup -q --host bench tree
done
echo -e "kura\tsnapshots\t$("$KURA" -r "$KR" snapshots --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" | tee -a "$OUT"
echo -e "kura\tindex-bytes\t$(du -sb "$KR/index" | cut -f1)" | tee -a "$OUT"
measure kura prune-many "$KR" "$KURA" -r "$KR" prune --max-unused 0%
measure kura check-many "$KR" "$KURA" -r "$KR" check
measure kura check-read-data-many "$KR" "$KURA" -r "$KR" check --read-data

python3 "$HERE/summarize_prune.py" "$OUT"
