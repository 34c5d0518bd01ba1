#!/usr/bin/env bash
# Initial sync of the kernel tree (../shared/bench corpus) to a standby on loopback: kura serve
# + `kura shadow push --once` (until every record is durable and applied on the mirror) beside
# `rsync -a` to a local rsync daemon. Medians of ROUNDS (3). Not part of CI.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ROUNDS=${ROUNDS:-3}
need rsync rsync
need bc bc
prepare
W=$BENCH_DIR/shadow-initial; rm -rf "$W"; mkdir -p "$W"
SRC=$BENCH_DIR/linux
find "$SRC" -type f -print0 | xargs -0 cat >/dev/null   # warm the page cache
OUT=$W/results.tsv; : >"$OUT"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for r in $(seq "$ROUNDS"); do
  # rsync to a daemon on loopback.
  rm -rf "$W/rsync-dst"; mkdir -p "$W/rsync-dst"
  P=$(port)
  printf 'use chroot = no\n[dst]\npath = %s\nread only = no\nuid = root\ngid = root\n' "$W/rsync-dst" >"$W/rsyncd.conf"
  rsync --daemon --no-detach --port "$P" --address 127.0.0.1 --config "$W/rsyncd.conf" & RS=$!
  sleep 0.5
  s=$(date +%s.%N); rsync -a "$SRC/" "rsync://127.0.0.1:$P/dst/"; e=$(date +%s.%N)
  kill $RS; wait $RS 2>/dev/null || true
  printf 'rsync\t%s\t%.2f\n' "$r" "$(echo "$e - $s" | bc)" | tee -a "$OUT"
  # kura: serve + push --once + wait for the mirror.
  rm -rf "$W/kura"; mkdir -p "$W/kura"
  printf 'listen = "127.0.0.1:0"\nstate_dir = "%s"\n[[stream]]\nname = "linux"\nmirror = "%s"\n' "$W/kura/state" "$W/kura/mirror" >"$W/kura/server.toml"
  export KURA_TOKEN; KURA_TOKEN=$("$KURA" serve -c "$W/kura/server.toml" token add --role shadow --repository linux)
  "$KURA" serve -c "$W/kura/server.toml" >"$W/kura/serve.out" 2>"$W/kura/serve.log" & SV=$!
  for _ in $(seq 100); do grep -q fingerprint "$W/kura/serve.out" 2>/dev/null && break; sleep 0.05; done
  ADDR=$(grep -o 'https://[^ ]*' "$W/kura/serve.out" | head -1 | sed 's|https://||')
  export KURA_FINGERPRINT; KURA_FINGERPRINT=$(grep -o 'sha256:[0-9a-f]*' "$W/kura/serve.out" | head -1)
  s=$(date +%s.%N)
  HEAD=$("$KURA" --json shadow push --source "$SRC" --to "kura://$ADDR/linux" --once | python3 -c 'import json,sys; print(json.load(sys.stdin)["head"])')
  m=$(date +%s.%N)
  "$KURA" shadow wait "$HEAD" --to "kura://$ADDR/linux" --timeout 600s
  e=$(date +%s.%N)
  kill $SV; wait $SV 2>/dev/null || true
  printf 'kura-journaled\t%s\t%.2f\n' "$r" "$(echo "$m - $s" | bc)" | tee -a "$OUT"
  printf 'kura-applied\t%s\t%.2f\n' "$r" "$(echo "$e - $s" | bc)" | tee -a "$OUT"
  diff -r "$SRC" "$W/kura/mirror" >/dev/null && echo "mirror identical" || echo "MIRROR DIFFERS"
done
python3 - "$OUT" <<'PY'
import statistics, sys
rows = [l.split('\t') for l in open(sys.argv[1]) if l.strip()]
med = {t: statistics.median(float(r[2]) for r in rows if r[0] == t) for t in ('rsync', 'kura-journaled', 'kura-applied')}
print('median wall s: rsync -a to a daemon %.2f | kura push (journaled) %.2f | kura until applied on the mirror %.2f | ratio applied/rsync %.2f'
      % (med['rsync'], med['kura-journaled'], med['kura-applied'], med['kura-applied'] / med['rsync']))
PY
rm -rf "$W/rsync-dst" "$W/kura"
