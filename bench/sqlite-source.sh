#!/usr/bin/env bash
# SQLite change capture in one process, before the stream carries it: a Python writer commits
# RATE one-row transactions/s (seq, commit time in ns; WAL, synchronous=NORMAL, as
# ../shared/bench/shadow-peers.sh's) for SECONDS_LOAD s while crates/kura-shadow's
# sqlite_follow example reads the commits with sqlite_source (1 ms polls, a fenced checkpoint
# each second) and applies them to a mirror with sqlite_mirror. Lag of a row = when the
# follower saw it in the mirror - when its COMMIT returned. Prints lag p50/p99/max and the
# follower's CPU (reading, applying, and the measuring query) as % of one core, ROUNDS times.
# No network: the stream's share of the lag comes on top. Then, in the same run, Litestream
# 0.5.17 on the same load through ../shared/bench/shadow-peers.sh (its default, 100 ms and 1 ms
# intervals; LITESTREAM=0 skips it). Not part of CI (~1 minute per round, 2 for Litestream).
#   ROUNDS=3 RATE=1000 SECONDS_LOAD=20 bench/sqlite-source.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-1000}
LOAD=${SECONDS_LOAD:-20}
(cd "$ROOT" && cargo build --release --quiet -p kura-shadow --example sqlite_follow)
FOLLOW=$ROOT/target/release/examples/sqlite_follow
W="$BENCH_DIR/sqlite-source"; rm -rf "$W"; mkdir -p "$W"
for r in $(seq 1 "$ROUNDS"); do
  rm -f "$W"/app.db* "$W"/mirror.db*
  python3 "$HERE/sqlite_writer.py" create "$W/app.db"
  python3 "$HERE/sqlite_writer.py" write "$W/app.db" "$RATE" "$((LOAD + 3))" >"$W/writer.log" &
  WRITER=$!
  sleep 0.5
  "$FOLLOW" "$W/app.db" "$W/mirror.db" "$LOAD" | tee -a "$W/results.txt"
  wait "$WRITER"; cat "$W/writer.log"
done

if [ "${LITESTREAM:-1}" = 1 ]; then
  litestream_beside "$W" "$LOAD" "$RATE" "in one process, no network"
fi
