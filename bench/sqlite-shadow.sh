#!/usr/bin/env bash
# SQLite shadowing end to end on loopback: a Python writer commits RATE one-row transactions/s
# (seq, commit time in ns; WAL, synchronous=NORMAL, as ../shared/bench/shadow-peers.sh's) for
# SECONDS_LOAD s; `kura shadow push --sqlite` sends every commit over TLS to a `kura serve`
# whose stream applies it to its mirror; an observer opens the mirror read-only every ms and
# notes when each row becomes visible. Lag of a row = visible on the standby's copy - its
# COMMIT returned on the primary. Prints lag p50/p99/max, the CPU of the pusher and of the
# server as % of one core (from /proc, over the load), bytes the pusher sent (the standby's
# journal growth), and the time of `kura shadow restore --sqlite` of the head, ROUNDS times.
# The same machine runs all of it on 2 shared cores: the figures include that contention.
# Then Litestream 0.5.17 on the same load through ../shared/bench/shadow-peers.sh (its default,
# 100 ms and 1 ms intervals; LITESTREAM=0 skips it). Not part of CI.
#   ROUNDS=3 RATE=1000 SECONDS_LOAD=60 [INTERVAL=5ms] bench/sqlite-shadow.sh
# PERF=1 also records the server's profile over the load (perf report -i ROUND/serve.perf); the
# sampling costs CPU, so its figures are not comparable with a run without it.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-1000}
LOAD=${SECONDS_LOAD:-60}
# KURA=path runs another build (an A/B comparison: run each in turn, several times).
if [ -z "${KURA:-}" ]; then (cd "$ROOT" && cargo build --release --quiet -p kura); fi
KURA=${KURA:-$ROOT/target/release/kura}
W="$BENCH_DIR/sqlite-shadow"; rm -rf "$W"; mkdir -p "$W"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
for r in $(seq 1 "$ROUNDS"); do
  R="$W/round$r"; mkdir -p "$R"
  python3 "$HERE/sqlite_writer.py" create "$R/app.db"
  cat >"$R/server.toml" <<TOML
listen = "127.0.0.1:0"
state_dir = "$R/state"
[[stream]]
name = "db"
mirror = "$R/mirror"
window = "1d"
TOML
  TOKEN=$("$KURA" serve -c "$R/server.toml" token add --role shadow --repository db)
  "$KURA" serve -c "$R/server.toml" >"$R/serve.out" 2>"$R/serve.log" &
  SERVE=$!
  for _ in $(seq 100); do grep -q fingerprint "$R/serve.out" 2>/dev/null && break; sleep 0.05; done
  ADDR=$(grep -o 'https://[^ ]*' "$R/serve.out" | head -1 | sed 's|https://||')
  export KURA_TOKEN=$TOKEN KURA_FINGERPRINT=$(grep -o 'sha256:[0-9a-f]*' "$R/serve.out" | head -1) KURA_STATE_DIR="$R/push-state"
  "$KURA" shadow push --sqlite "$R/app.db" --to "kura://$ADDR/db" ${INTERVAL:+--interval "$INTERVAL"} 2>"$R/push.log" &
  PUSH=$!
  for _ in $(seq 200); do [ -f "$R/mirror/app.db" ] && break; sleep 0.05; done
  python3 - "$R/mirror/app.db" "$((LOAD + 5))" >"$R/observer.txt" <<'PY' &
import sqlite3, sys, time
path, secs = sys.argv[1], float(sys.argv[2])
t0 = time.time(); seen = 0; lags = []
db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, isolation_level=None)
while time.time() - t0 < secs:
    try:
        rows = db.execute("SELECT seq, ns FROM t WHERE seq > ?", (seen,)).fetchall()
    except sqlite3.Error:
        rows = []
    now = time.time_ns()
    for s, ns in rows:
        lags.append(now - ns); seen = max(seen, s)
    time.sleep(0.001)
lags.sort()
q = lambda p: lags[min(len(lags) - 1, int(p * (len(lags) - 1)))] / 1e6 if lags else float("nan")
print("rows %d lag_ms p50 %.2f p99 %.2f max %.2f" % (len(lags), q(0.5), q(0.99), q(1.0)))
PY
  OBS=$!
  sleep 1
  # The journal's bytes as the standby counts them (its frames: du would count zeros written ahead).
  jbytes() { "$KURA" --json shadow status --to "kura://$ADDR/db" | python3 -c 'import json,sys; print(json.load(sys.stdin)["journal_bytes"])'; }
  J0=$(jbytes)
  P0=$(ticks $PUSH); S0=$(ticks $SERVE); T0=$(date +%s.%N)
  M0=$(awk '/VmRSS/ {print $2}' /proc/$SERVE/status)
  W0=$(awk '/^wchar/ {print $2}' /proc/$SERVE/io)
  if [ -n "${PERF:-}" ]; then perf record -q ${PERF_EVENT:+-e $PERF_EVENT} -F 499 ${PERF_CG:--g} -p "$SERVE" -o "$R/serve.perf" 2>/dev/null & PERFPID=$!; fi
  if [ -n "${STRACE:-}" ]; then strace -c -f -p "$SERVE" -o "$R/serve.strace" & PERFPID=$!; fi
  # The server's RSS once a minute during the load: flat when nothing it holds grows with the window.
  (while kill -0 $SERVE 2>/dev/null; do sleep 60; awk '/VmRSS/ {printf "%.1f ", $2/1024}' /proc/$SERVE/status 2>/dev/null; done) >"$R/rss.txt" &
  RSSPID=$!
  python3 "$HERE/sqlite_writer.py" write "$R/app.db" "$RATE" "$LOAD" >"$R/writer.log"
  kill $RSSPID 2>/dev/null; wait $RSSPID 2>/dev/null || true
  if [ -n "${PERF:-}${STRACE:-}" ]; then kill -INT $PERFPID; wait $PERFPID || true; fi
  P1=$(ticks $PUSH); S1=$(ticks $SERVE); T1=$(date +%s.%N)
  M1=$(awk '/VmRSS/ {print $2}' /proc/$SERVE/status)
  W1=$(awk '/^wchar/ {print $2}' /proc/$SERVE/io)
  wait $OBS
  J1=$(jbytes)
  HEAD=$("$KURA" --json shadow status --to "kura://$ADDR/db" | python3 -c 'import json,sys; print(json.load(sys.stdin)["head"])')
  kill $PUSH $SERVE; wait $PUSH $SERVE 2>/dev/null || true
  RS=$(date +%s.%N)
  "$KURA" shadow restore --journal "$R/state/shadow/db" --sqlite --target "$R/restored.db" 2>/dev/null
  RE=$(date +%s.%N)
  ROWS=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from t').fetchone()[0])" "$R/restored.db")
  python3 - "$P0" "$P1" "$S0" "$S1" "$T0" "$T1" "$HZ" "$J0" "$J1" "$RS" "$RE" "$HEAD" "$ROWS" "$(cat "$R/observer.txt")" "$(cat "$R/writer.log")" "$M0" "$M1" "$(cat "$R/rss.txt")" "$W0" "$W1" <<'PY' | tee -a "$W/results.txt"
import sys
p0, p1, s0, s1 = map(int, sys.argv[1:5]); t0, t1 = float(sys.argv[5]), float(sys.argv[6]); hz = int(sys.argv[7])
j0, j1 = int(sys.argv[8]), int(sys.argv[9]); rs, re = float(sys.argv[10]), float(sys.argv[11])
wall = t1 - t0
commits = max(1, int(sys.argv[15].split()[1])); m0, m1 = int(sys.argv[16]), int(sys.argv[17])
print("%s | %s | cpu_pct pusher %.2f server %.2f | journal +%.1f MB (%.0f B/commit; the server wrote %.1f MB in all) | server RSS +%.1f MB (%.0f B/commit; from %.1f MB, then MB each minute: %s) | records %s | restore head %.2f s, %s rows" % (
    sys.argv[14], sys.argv[15], 100 * (p1 - p0) / hz / wall, 100 * (s1 - s0) / hz / wall,
    (j1 - j0) / 1e6, (j1 - j0) / commits, (int(sys.argv[20]) - int(sys.argv[19])) / 1e6, (m1 - m0) / 1e3, (m1 - m0) * 1024 / commits, m0 / 1024, sys.argv[18].strip() or "-", sys.argv[12], re - rs, sys.argv[13]))
PY
done

if [ "${LITESTREAM:-1}" = 1 ]; then
  litestream_beside "$W" "$LOAD" "$RATE" "pusher -> kura serve over TLS on loopback -> mirror"
fi
