#!/usr/bin/env bash
# Backup and restore through a server on loopback, TLS on everywhere: kura to a local directory,
# kura through `kura serve` (pinned self-signed certificate), and restic through
# `rclone serve restic` (restic's REST protocol, over TLS with the same kind of certificate).
# Each round uses fresh repositories: first backup of the Linux tree, incremental backup of the
# ~2%-changed tree at the same path, full restore to tmpfs. Rounds alternate the three; the
# summary prints medians and the ratios of issue 5 (server/local ≤ 1.3, server/restic ≤ 0.5),
# plus the server process's own CPU. Not part of CI (~15 minutes).
#   ROUNDS=3 BENCH_DIR=/tmp/kura-bench bench/server.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
ROUNDS=${ROUNDS:-3}
need restic restic
need rclone rclone
need bc bc
prepare

W="$BENCH_DIR/server"; rm -rf "$W"; mkdir -p "$W"
export RESTIC_PASSWORD=bench KURA_PASSWORD=bench RESTIC_CACHE_DIR="$W/restic-cache"
OUT="$W/results.tsv"
printf 'tool\tstep\tround\twall_s\tcpu_s\tmaxrss_kb\tserver_cpu_s\n' >"$OUT"
RESTORE=/dev/shm/kura-bench-restore
SERVER_PID=""

trap stop_server EXIT

# The trees are backed up from one path, so the incremental backup has a parent.
TREE="$W/tree"
use_tree() { rm -rf "$TREE"; cp -a "$BENCH_DIR/$1" "$TREE"; }
warm() { find "$TREE" -type f -print0 | xargs -0 cat >/dev/null; }

run_kura_local() { # round
  local r=$1 repo="$W/kura-local"
  rm -rf "$repo"; "$KURA" -r "$repo" init -q
  use_tree linux; warm
  measure kura-local backup "$r" "$KURA" -r "$repo" backup -q --host bench "$TREE"
  use_tree linux-v2; warm
  measure kura-local incremental "$r" "$KURA" -r "$repo" backup -q --host bench "$TREE"
  rm -rf "$RESTORE"
  measure kura-local restore "$r" "$KURA" -r "$repo" restore -q latest --target "$RESTORE"
  rm -rf "$RESTORE" "$repo"
}

run_kura_server() { # round
  local r=$1 state="$W/kura-state"
  rm -rf "$state"; mkdir -p "$state"
  printf 'listen = "127.0.0.1:0"\nstate_dir = "%s"\n[[repository]]\nname = "bench"\n' "$state" >"$W/server.toml"
  "$KURA" serve -c "$W/server.toml" token add --role admin --repository bench >"$W/admin.tok" 2>/dev/null
  "$KURA" serve -c "$W/server.toml" token add --role backup --repository bench >"$W/backup.tok" 2>/dev/null
  RUST_LOG=warn "$KURA" serve -c "$W/server.toml" >"$W/serve.out" 2>"$W/serve.log" &
  SERVER_PID=$!
  for _ in $(seq 100); do grep -q fingerprint "$W/serve.out" 2>/dev/null && break; sleep 0.1; done
  local addr fp; addr=$(grep -o 'https://[0-9.:]*' "$W/serve.out" | sed 's|https://||'); fp=$(grep -o 'sha256:[0-9a-f]*' "$W/serve.out")
  local url="kura://$addr/bench"
  KURA_FINGERPRINT=$fp "$KURA" -r "$url" --token-file "$W/admin.tok" init -q
  use_tree linux; warm
  measure kura-server backup "$r" env KURA_FINGERPRINT="$fp" "$KURA" -r "$url" --token-file "$W/backup.tok" backup -q --host bench "$TREE"
  use_tree linux-v2; warm
  measure kura-server incremental "$r" env KURA_FINGERPRINT="$fp" "$KURA" -r "$url" --token-file "$W/backup.tok" backup -q --host bench "$TREE"
  rm -rf "$RESTORE"
  measure kura-server restore "$r" env KURA_FINGERPRINT="$fp" "$KURA" -r "$url" --token-file "$W/backup.tok" restore -q latest --target "$RESTORE"
  rm -rf "$RESTORE"
  cp "$state/tls/cert.pem" "$W/cert.pem"; cp "$state/tls/key.pem" "$W/key.pem"
  stop_server; rm -rf "$state"
}

run_restic_rclone() { # round
  local r=$1 data="$W/rclone-data"
  rm -rf "$data" "$RESTIC_CACHE_DIR"; mkdir -p "$data"
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  rclone serve restic --addr "127.0.0.1:$port" --cert "$W/cert.pem" --key "$W/key.pem" "$data" >"$W/rclone.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  local repo="rest:https://127.0.0.1:$port/"
  restic -q -r "$repo" --cacert "$W/cert.pem" init --repository-version 2
  use_tree linux; warm
  measure restic-rclone backup "$r" restic -q -r "$repo" --cacert "$W/cert.pem" backup --host bench "$TREE"
  use_tree linux-v2; warm
  measure restic-rclone incremental "$r" restic -q -r "$repo" --cacert "$W/cert.pem" backup --host bench "$TREE"
  rm -rf "$RESTORE"
  measure restic-rclone restore "$r" restic -q -r "$repo" --cacert "$W/cert.pem" restore latest --target "$RESTORE"
  rm -rf "$RESTORE"
  stop_server; rm -rf "$data"
}

for r in $(seq "$ROUNDS"); do
  run_kura_local "$r"
  run_kura_server "$r"
  run_restic_rclone "$r"
done
rm -rf "$TREE"
python3 "$HERE/summarize_server.py" "$OUT"
