#!/usr/bin/env bash
# PostgreSQL WAL archiving, side by side on the same pgbench load: kura `pg wal-push`,
# pgBackRest `archive-push` (Debian's pgbackrest, synchronous, its default gz compression) and
# the `cp` archive_command of PostgreSQL's manual (no fsync). For each archiver a fresh
# PostgreSQL 15 cluster runs `pgbench -i -s $SCALE` and `pgbench -T $SECONDS -c 4` while the
# archive_command is held back, so the WAL piles up; then it is released and the drain is
# timed: archive throughput (MiB of WAL per second), per-segment wall and CPU (median, from
# /usr/bin/time around every call) and the archive's size. kura then proves its archive:
# a point-in-time restore from the base backup taken before the load, replayed to the end,
# started, and pgbench_history counted against the original. Not part of CI (~5 minutes).
#   SCALE=30 SECONDS_LOAD=30 bench/pg.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
SCALE=${SCALE:-30}
LOAD_SECONDS=${SECONDS_LOAD:-30}
need bc bc
need pgbackrest pgbackrest
PG_BIN=/usr/lib/postgresql/15/bin
[ -x "$PG_BIN/initdb" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >/dev/null; }
(cd "$ROOT" && cargo build --release --quiet --bin kura)
KURA=$ROOT/target/release/kura

W="$BENCH_DIR/pg"; rm -rf "$W"; mkdir -p "$W"
OUT="$W/results.tsv"
printf 'tool\tsegments\twal_mib\tdrain_s\tmib_per_s\tseg_wall_median_s\tseg_cpu_median_s\tcpu_total_s\tarchive_mib\n' >"$OUT"
# PostgreSQL will not run as root.
as_pg() { if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --clear-groups "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres:postgres "$W"
chmod 755 "$W"
PORT=55432
trap 'for d in "$W"/*/data; do as_pg "$PG_BIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true; done' EXIT

# archiver TOOL: writes $W/TOOL/archive.sh, the archive_command's body for TOOL.
archiver() {
  local t=$1 d="$W/$1"
  case $t in
    cp) mkdir -p "$d/archive"; body="test ! -f $d/archive/\$2 && cp \"\$1\" $d/archive/\$2" ;;
    pgbackrest)
      mkdir -p "$d/repo" "$d/log" "$d/lock" "$d/spool"
      printf '[global]\nrepo1-path=%s/repo\nlog-path=%s/log\nlock-path=%s/lock\nspool-path=%s/spool\nlog-level-console=warn\n[bench]\npg1-path=%s/data\npg1-port=%s\npg1-socket-path=%s\n' \
        "$d" "$d" "$d" "$d" "$d" "$PORT" "$d" >"$d/pgbackrest.conf"
      body="pgbackrest --config=$d/pgbackrest.conf --stanza=bench archive-push \"\$1\"" ;;
    kura)
      echo bench >"$d/pw"; chmod 600 "$d/pw"
      body="$KURA -q -r $d/repo --password-file $d/pw pg wal-push \"\$1\"" ;;
  esac
  # Held while $d/hold exists; every call timed.
  cat >"$d/archive.sh" <<EOF
#!/bin/sh
while [ -e $d/hold ]; do sleep 0.2; done
exec /usr/bin/time -f '%e %U %S' -a -o $d/times sh -c '$body' archive "\$1" "\$2"
EOF
  chmod 755 "$d/archive.sh"
}

psql_() { as_pg "$PG_BIN/psql" -h "$1" -p "$PORT" -U postgres -X -A -t -d postgres -c "$2"; }

for tool in cp pgbackrest kura; do
  d="$W/$tool"; mkdir -p "$d"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$d"
  archiver "$tool"
  [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$d"
  as_pg "$PG_BIN/initdb" -D "$d/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
  printf "wal_level = replica\narchive_mode = on\narchive_command = '%s/archive.sh %%p %%f'\nmax_wal_size = 4GB\nport = %s\nlisten_addresses = ''\nunix_socket_directories = '%s'\n" \
    "$d" "$PORT" "$d" >>"$d/data/postgresql.conf"
  as_pg "$PG_BIN/pg_ctl" -D "$d/data" -l "$d/pg.log" -w start >/dev/null
  case $tool in
    pgbackrest) as_pg pgbackrest --config="$d/pgbackrest.conf" --stanza=bench stanza-create >/dev/null ;;
    kura)
      as_pg "$KURA" -q -r "$d/repo" --password-file "$d/pw" init
      as_pg env HOME="$d" "$KURA" -q -r "$d/repo" --password-file "$d/pw" pg backup -- -h "$d" -p "$PORT" -U postgres ;;
  esac
  rm -f "$d/times"
  as_pg touch "$d/hold"
  echo "$tool: pgbench -i -s $SCALE, then $LOAD_SECONDS s of pgbench -c 4 with archiving held" >&2
  as_pg "$PG_BIN/pgbench" -h "$d" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
  as_pg "$PG_BIN/pgbench" -h "$d" -p "$PORT" -U postgres -c 4 -j 2 -T "$LOAD_SECONDS" postgres >"$d/pgbench.log" 2>&1
  last=$(psql_ "$d" "SELECT pg_walfile_name(pg_switch_wal())")
  rows=$(psql_ "$d" "SELECT count(*) FROM pgbench_history")
  sleep 1
  ready=$(find "$d/data/pg_wal/archive_status" -name '*.ready' | wc -l)
  start=$(date +%s.%N)
  rm -f "$d/hold"
  until [ "$(psql_ "$d" "SELECT coalesce(last_archived_wal >= '$last', false) FROM pg_stat_archiver")" = t ]; do
    failed=$(psql_ "$d" "SELECT failed_count FROM pg_stat_archiver")
    [ "$failed" = 0 ] || { echo "$tool: archive_command failed $failed time(s): $(tail -3 "$d/pg.log")" >&2; exit 1; }
    sleep 0.1
  done
  end=$(date +%s.%N)
  drain=$(echo "$end - $start" | bc)
  archived=$(psql_ "$d" "SELECT archived_count FROM pg_stat_archiver")
  mib=$(echo "$ready * 16" | bc)
  case $tool in cp) arch="$d/archive" ;; *) arch="$d/repo" ;; esac
  size=$(du -sm "$arch" | cut -f1)
  median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
  stats="$(awk '{ print $1 }' "$d/times" | median)	$(awk '{ print $2 + $3 }' "$d/times" | median)	$(awk '{ t += $2 + $3 } END { printf "%.1f", t }' "$d/times")"
  printf '%s\t%s\t%s\t%.2f\t%.1f\t%b\t%s\n' "$tool" "$ready" "$mib" "$drain" "$(echo "$mib / $drain" | bc -l)" "$stats" "$size" | tee -a "$OUT"
  echo "$tool: $archived archived in all; pgbench: $(grep -E '^tps' "$d/pgbench.log" | head -1)" >&2

  if [ "$tool" = kura ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$d/data" -m fast -w stop >/dev/null
    t0=$(date +%s.%N)
    as_pg env HOME="$d" "$KURA" -q -r "$d/repo" --password-file "$d/pw" pg restore --target "$d/restored"
    as_pg "$PG_BIN/pg_ctl" -D "$d/restored" -l "$d/restored.log" -o "-c archive_mode=off" -w -t 600 start >/dev/null
    until [ "$(psql_ "$d" "SELECT pg_is_in_recovery()")" = f ]; do sleep 0.2; done
    t1=$(date +%s.%N)
    got=$(psql_ "$d" "SELECT count(*) FROM pgbench_history")
    echo "kura restore: base backup + $archived WAL files replayed in $(echo "$t1 - $t0" | bc) s; pgbench_history $got rows (original $rows)" | tee -a "$W/restore.txt" >&2
    [ "$got" = "$rows" ] || { echo "kura restore: row count differs" >&2; exit 1; }
    as_pg "$PG_BIN/pg_ctl" -D "$d/restored" -m fast -w stop >/dev/null
  else
    as_pg "$PG_BIN/pg_ctl" -D "$d/data" -m fast -w stop >/dev/null
  fi
done

echo
column -t -s $'\t' "$OUT"
awk -F'\t' 'NR > 1 { r[$1] = $5 } END {
  printf "\nthroughput: kura %.1f MiB/s, pgBackRest %.1f MiB/s, cp %.1f MiB/s; kura/pgBackRest %.2fx, kura/cp %.2fx\n",
    r["kura"], r["pgbackrest"], r["cp"], r["kura"] / r["pgbackrest"], r["kura"] / r["cp"] }' "$OUT"
cat "$W/restore.txt"
