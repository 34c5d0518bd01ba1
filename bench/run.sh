#!/usr/bin/env bash
# Side-by-side benchmark of kura, restic and borg on the real corpora of ../shared/bench
# (Linux 6.1 source tree, a ~2% changed copy, a 512 MiB SQLite database and a 1%-updated copy).
# Runs ROUNDS paired rounds (kura, restic, kura, restic, ...; borg once) and prints every step as
# TSV, then a table of medians with kura/restic and kura/borg ratios. Not part of CI.
#   ROUNDS=3 TOOLS="kura restic borg" BENCH_DIR=/tmp/kura-bench bench/run.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
ROUNDS=${ROUNDS:-3}
TOOLS=${TOOLS:-kura restic borg}
RESTORE_DIR=${RESTORE_DIR:-/dev/shm/kura-bench-restore}
case " $TOOLS " in *" restic "*) need restic restic ;; esac
case " $TOOLS " in *" borg "*) need borg borgbackup ;; esac
prepare

W="$BENCH_DIR/run"; rm -rf "$W"; mkdir -p "$W"
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench KURA_PASSWORD=bench RESTIC_CACHE_DIR="$W/restic-cache" BORG_BASE_DIR="$W/borg-base"
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
OUT="$W/results.tsv"
printf 'round\ttool\tstep\twall_s\tcpu_s\tmaxrss_kb\trepo_bytes\n' >"$OUT"

measure() { # round tool step repo cmd...
  local round=$1 tool=$2 step=$3 repo=$4; shift 4
  /usr/bin/time -f '%e %U %S %M' -o "$W/time" "$@" >"$W/$tool-$step.log" 2>&1 || { echo "$tool $step failed: $(tail -2 "$W/$tool-$step.log")" >&2; return 1; }
  read -r wall user sys rss <"$W/time"
  printf '%s\t%s\t%s\t%s\t%.2f\t%s\t%s\n' "$round" "$tool" "$step" "$wall" "$(echo "$user + $sys" | bc)" "$rss" "$(du -sb "$repo" | cut -f1)" | tee -a "$OUT"
}

swap_v2() { (cd "$BENCH_DIR" && mv linux linux.hold && mv linux-v2 linux); }
unswap_v2() { (cd "$BENCH_DIR" && mv linux linux-v2 && mv linux.hold linux); }

one() { # round tool
  local r=$1 tool=$2 R="$W/$2-repo"
  rm -rf "$R" "$RESTORE_DIR" "$W/db"; mkdir -p "$W/db"
  cd "$BENCH_DIR"
  case $tool in
  kura)
    measure "$r" kura init "$W" "$KURA" -r "$R" init -q
    measure "$r" kura backup-linux "$R" "$KURA" -r "$R" backup -q --host bench linux
    measure "$r" kura rebackup-unchanged "$R" "$KURA" -r "$R" backup -q --host bench linux
    swap_v2; measure "$r" kura backup-incremental "$R" "$KURA" -r "$R" backup -q --host bench linux || true; unswap_v2
    measure "$r" kura restore "$R" "$KURA" -r "$R" restore latest -q --target "$RESTORE_DIR"
    cp db.sqlite "$W/db/db.sqlite"; cd "$W/db"
    measure "$r" kura backup-db "$R" "$KURA" -r "$R" backup -q --host bench db.sqlite
    cp "$BENCH_DIR/db-v2.sqlite" db.sqlite
    measure "$r" kura backup-db-v2 "$R" "$KURA" -r "$R" backup -q --host bench db.sqlite ;;
  restic)
    measure "$r" restic init "$W" restic init -q --repository-version 2 -r "$R"
    measure "$r" restic backup-linux "$R" restic -q -r "$R" backup --host bench linux
    measure "$r" restic rebackup-unchanged "$R" restic -q -r "$R" backup --host bench linux
    swap_v2; measure "$r" restic backup-incremental "$R" restic -q -r "$R" backup --host bench linux || true; unswap_v2
    measure "$r" restic restore "$R" restic -q -r "$R" restore latest --target "$RESTORE_DIR"
    cp db.sqlite "$W/db/db.sqlite"; cd "$W/db"
    measure "$r" restic backup-db "$R" restic -q -r "$R" backup --host bench db.sqlite
    cp "$BENCH_DIR/db-v2.sqlite" db.sqlite
    measure "$r" restic backup-db-v2 "$R" restic -q -r "$R" backup --host bench db.sqlite ;;
  borg)
    measure "$r" borg init "$W" borg init -e repokey-blake2 "$R"
    measure "$r" borg backup-linux "$R" borg create --compression zstd,3 "$R::l1" linux
    measure "$r" borg rebackup-unchanged "$R" borg create --compression zstd,3 "$R::l2" linux
    swap_v2; measure "$r" borg backup-incremental "$R" borg create --compression zstd,3 "$R::l3" linux || true; unswap_v2
    mkdir -p "$RESTORE_DIR"; cd "$RESTORE_DIR"
    measure "$r" borg restore "$R" borg extract "$R::l3"
    cp "$BENCH_DIR/db.sqlite" "$W/db/db.sqlite"; cd "$W/db"
    measure "$r" borg backup-db "$R" borg create --compression zstd,3 "$R::d1" db.sqlite
    cp "$BENCH_DIR/db-v2.sqlite" db.sqlite
    measure "$r" borg backup-db-v2 "$R" borg create --compression zstd,3 "$R::d2" db.sqlite ;;
  esac
  cd "$BENCH_DIR"; rm -rf "$RESTORE_DIR" "$W/db" "$R"
}

tar cf - -C "$BENCH_DIR" linux linux-v2 db.sqlite db-v2.sqlite | cat >/dev/null   # warm the page cache
for r in $(seq "$ROUNDS"); do
  for tool in $TOOLS; do
    [ "$tool" = borg ] && [ "$r" -gt 1 ] && continue
    one "$r" "$tool"
  done
done
python3 "$HERE/summarize.py" "$OUT" "$(stat -c %s "$BENCH_DIR/db.sqlite")"
