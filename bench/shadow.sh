#!/usr/bin/env bash
# Shadowing lag, kura beside lsyncd, on the load of ../shared/bench/shadow-peers.sh (1,000 file
# changes/s: 70% new files of 1-64 KiB, 20% overwrites, 10% deletes; lag = change on the source
# to the change visible on the target). lsyncd runs through that script (cases delay0 and its
# default delay); kura runs the same harness case with kura serve + kura shadow push in lsyncd's
# place (bench/shadow_kura.py). Not part of CI (a few minutes; KURA_DURATION=600 for the drift run).
#
#   DURATION=60 KURA_DURATION=60 bench/shadow.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
DURATION=${DURATION:-60}
KURA_DURATION=${KURA_DURATION:-$DURATION}
RUN_LSYNCD=${RUN_LSYNCD:-1}
(cd "$ROOT" && cargo build --release --quiet --bin kura)
KURA=$ROOT/target/release/kura
W=$BENCH_DIR/shadow
mkdir -p "$W"
OUT=$W/results-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
if [ "$RUN_LSYNCD" = 1 ]; then
  WORK=$W OUT=$OUT/lsyncd RUN=lsyncd DURATION=$DURATION FS_CASES="delay0:0:$DURATION default:default:20:25" \
    "$SHARED/shadow-peers.sh" >"$OUT/lsyncd.log" 2>&1 || { tail -20 "$OUT/lsyncd.log"; exit 1; }
else
  # Only the harness and its venv are needed.
  WORK=$W OUT=$OUT/lsyncd RUN=lsyncd FS_CASES="" "$SHARED/shadow-peers.sh" >"$OUT/lsyncd.log" 2>&1 || true
fi
"$W/venv/bin/python" "$HERE/shadow_kura.py" "$W/shadow-peers-harness.py" "$KURA" fs-case --work "$W" --label "load$KURA_DURATION" \
  --rate 1000 --duration "$KURA_DURATION" --grace 10 --tail 10 >"$OUT/kura.out" 2>"$OUT/kura.log"
tail -1 "$OUT/kura.out" >"$OUT/kura.jsonl"
rm -rf "$W/lsyncd-load$KURA_DURATION/src" "$W/lsyncd-load$KURA_DURATION/dst"
# The same load with new files up to 1 MiB (BIG_DURATION=0 skips it).
BIG_DURATION=${BIG_DURATION:-30}
if [ "$BIG_DURATION" != 0 ]; then
  KURA_MAX_FILE=1048576 "$W/venv/bin/python" "$HERE/shadow_kura.py" "$W/shadow-peers-harness.py" "$KURA" fs-case --work "$W" --label "big$BIG_DURATION" \
    --rate 1000 --duration "$BIG_DURATION" --grace 30 --tail 30 >"$OUT/kura-big.out" 2>"$OUT/kura-big.log"
  tail -1 "$OUT/kura-big.out" >>"$OUT/kura.jsonl"
  rm -rf "$W/lsyncd-big$BIG_DURATION"
fi
python3 "$HERE/summarize_shadow.py" "$OUT"/lsyncd/results.jsonl "$OUT/kura.jsonl" | tee "$OUT/summary.txt"
echo "results: $OUT"
