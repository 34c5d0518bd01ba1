# Sourced by the benchmarks: where things are, installing peers (Debian packages), and building
# the corpora of ../shared/bench and the release binary.
HERE=$(cd "$(dirname "${BASH_SOURCE[1]:-$0}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
BENCH_DIR=${BENCH_DIR:-/tmp/kura-bench}
export BENCH_DIR

# need COMMAND PACKAGE: installs PACKAGE unless COMMAND exists.
need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null; }; }

# Builds the corpora and the release binary; sets KURA.
prepare() {
  need /usr/bin/time time
  "$SHARED/corpus.sh" >/dev/null
  (cd "$ROOT" && cargo build --release --quiet --bin kura)
  KURA=$ROOT/target/release/kura
}

# cpu_of PID: user+system CPU seconds of a process (0 without one).
cpu_of() {
  [ -n "$1" ] || { echo 0; return; }
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}

# measure TOOL STEP ROUND CMD...: runs CMD under /usr/bin/time and appends one row to $OUT
# (wall, client CPU, peak RSS, and the CPU $SERVER_PID used meanwhile); the command's output
# goes to $W/TOOL-STEP.log.
measure() {
  local tool=$1 step=$2 round=$3; shift 3
  local s0; s0=$(cpu_of "${SERVER_PID:-}")
  /usr/bin/time -f '%e %U %S %M' -o "$W/time" "$@" >"$W/$tool-$step.log" 2>&1 || { echo "$tool $step failed: $(tail -3 "$W/$tool-$step.log")" >&2; return 1; }
  local s1; s1=$(cpu_of "${SERVER_PID:-}")
  read -r wall user sys rss <"$W/time"
  printf '%s\t%s\t%s\t%s\t%.2f\t%s\t%.2f\n' "$tool" "$step" "$round" "$wall" "$(echo "$user + $sys" | bc)" "$rss" "$(echo "$s1 - $s0" | bc)" | tee -a "$OUT"
}

# Stops the server a benchmark started (SERVER_PID), if any.
stop_server() { if [ -n "${SERVER_PID:-}" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi; SERVER_PID=""; }

# Litestream 0.5 on the SQLite benches' load, through ../shared/bench/shadow-peers.sh (its default,
# 100 ms and 1 ms intervals), then kura's results (W/results.txt, described by LABEL) beside it.
# Usage: litestream_beside W LOAD RATE LABEL
litestream_beside() {
  local w=$1 load=$2 rate=$3 label=$4
  WORK="$w/litestream" RUN=litestream DURATION="$load" LS_RATE="$rate" \
    LS_CASES="default:-:-:$load 100ms:100ms:100ms:$load 1ms:1ms:1ms:$load" OUT="$w/litestream/out" \
    bash "$SHARED/shadow-peers.sh" >"$w/litestream.log" 2>&1
  echo; echo "kura ($label):"; cat "$w/results.txt"
  echo "Litestream 0.5 (file replica), same load (tool_cpu_s over ${load} s):"
  cut -f1,5-10 "$w/litestream/out/summary.tsv" | column -t
}
