#!/usr/bin/env bash
# Backup and restore of the Linux tree to an S3 server on loopback (s3s-fs, the server the test
# suite uses, storing objects as plain files), beside the same operations on a local directory
# repository, and restic to the same S3 server. Each round uses fresh repositories: first
# backup, incremental backup of the ~2%-changed tree at the same path, full restore to tmpfs.
# The summary prints medians and issue 6's ratio (S3/local ≤ 1.5), and kura's S3 request
# counts and bytes per step (KURA_S3_STATS). Not part of CI (~15 minutes).
#   ROUNDS=3 BENCH_DIR=/tmp/kura-bench bench/s3.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
ROUNDS=${ROUNDS:-3}
need restic restic
need bc bc
prepare
eval "$("$ROOT/scripts/test-deps")"; export KURA_S3S_FS

W="$BENCH_DIR/s3"; rm -rf "$W"; mkdir -p "$W"
export RESTIC_PASSWORD=bench KURA_PASSWORD=bench RESTIC_CACHE_DIR="$W/restic-cache"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret-key AWS_REGION=us-east-1
OUT="$W/results.tsv"
printf 'tool\tstep\tround\twall_s\tcpu_s\tmaxrss_kb\tserver_cpu_s\n' >"$OUT"
RESTORE=/dev/shm/kura-bench-restore
SERVER_PID=""

measure_s3() { # measure, then the S3 request counts the command printed (KURA_S3_STATS)
  measure "$@"
  grep '^s3 requests' "$W/$1-$2.log" | sed "s/^/  $1 $2: /" || true
}
trap stop_server EXIT
start_s3() {
  rm -rf "$W/s3data"; mkdir -p "$W/s3data/bench"
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$KURA_S3S_FS" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$W/s3data" >"$W/s3s.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT"
}

TREE="$W/tree"
use_tree() { rm -rf "$TREE"; cp -a "$BENCH_DIR/$1" "$TREE"; }
warm() { find "$TREE" -type f -print0 | xargs -0 cat >/dev/null; }

run_kura() { # tool round repo
  local tool=$1 r=$2 repo=$3
  "$KURA" -r "$repo" init -q
  use_tree linux; warm
  measure_s3 "$tool" backup "$r" "$KURA" -r "$repo" backup -q --host bench "$TREE"
  use_tree linux-v2; warm
  measure_s3 "$tool" incremental "$r" "$KURA" -r "$repo" backup -q --host bench "$TREE"
  rm -rf "$RESTORE"
  measure_s3 "$tool" restore "$r" "$KURA" -r "$repo" restore -q latest --target "$RESTORE"
  rm -rf "$RESTORE"
}

for r in $(seq "$ROUNDS"); do
  rm -rf "$W/kura-local"; run_kura kura-local "$r" "$W/kura-local"; rm -rf "$W/kura-local"
  start_s3; KURA_S3_STATS=1 run_kura kura-s3 "$r" "s3://bench/kura"; stop_server
  start_s3
  repo="s3:$AWS_ENDPOINT_URL/bench/restic"; rm -rf "$RESTIC_CACHE_DIR"
  restic -q -r "$repo" init --repository-version 2
  use_tree linux; warm
  measure restic-s3 backup "$r" restic -q -r "$repo" backup --host bench "$TREE"
  use_tree linux-v2; warm
  measure restic-s3 incremental "$r" restic -q -r "$repo" backup --host bench "$TREE"
  rm -rf "$RESTORE"
  measure restic-s3 restore "$r" restic -q -r "$repo" restore latest --target "$RESTORE"
  rm -rf "$RESTORE"; stop_server
done
rm -rf "$TREE"
python3 "$HERE/summarize_server.py" "$OUT" kura-local kura-s3 restic-s3
