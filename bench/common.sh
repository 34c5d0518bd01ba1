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
