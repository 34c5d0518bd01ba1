#!/usr/bin/env bash
# Pull-sync of 30 incremental snapshots of the Linux tree between two `kura serve` processes on
# loopback (TLS, pinned certificates, a read token on the source), beside a plain local copy of
# the same pack bytes (cp -a) and `restic copy` between two restic repositories of the same 30
# snapshots (the destination made with --copy-chunker-params, so restic dedups too). Each of
# ROUNDS rounds pulls into an empty replica, then one more snapshot incrementally. Prints bytes
# fetched against the source's stored bytes (the unique data) and the wall-time ratios of
# issue 9 (pull ≤ 1.5× the local copy), and `kura copy` (re-encrypting, the counterpart of
# restic copy) of the same snapshots between two directories. DISK_DIR puts the replica and the
# plain copy on a real disk (the copy then ends with sync, as every pull's pack is fsynced);
# by default they are on tmpfs beside the corpus. Not part of CI (~15 minutes).
#   ROUNDS=3 BENCH_DIR=/dev/shm/kb DISK_DIR=/var/tmp/kura-pull bench/pull.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
ROUNDS=${ROUNDS:-3}
SNAPSHOTS=${SNAPSHOTS:-30}
need restic restic
need bc bc
need curl curl
prepare

W="$BENCH_DIR/pull"; rm -rf "$W"; mkdir -p "$W"
D=${DISK_DIR:-$W}; mkdir -p "$D"
export RESTIC_PASSWORD=bench RESTIC_FROM_PASSWORD=bench KURA_PASSWORD=bench KURA_FROM_PASSWORD=bench RESTIC_CACHE_DIR="$W/restic-cache"
OUT="$W/results.tsv"
printf 'tool\tstep\tround\twall_s\tcpu_s\tmaxrss_kb\tserver_cpu_s\n' >"$OUT"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

# serve NAME CONFIG_EXTRA: starts a server hosting repository NAME; sets ADDR, FP, PID and
# writes admin/backup/read tokens to $W/NAME.{admin,backup,read}.
serve() {
  local name=$1 extra=$2 state="${3:-$W}/$1-state"
  mkdir -p "$state"
  printf 'listen = "127.0.0.1:0"\nstate_dir = "%s"\n[[repository]]\nname = "%s"\n%s\n' "$state" "$name" "$extra" >"$W/$name.toml"
  for role in admin backup read; do
    [ -s "$W/$name.$role" ] || "$KURA" serve -c "$W/$name.toml" token add --role $role --repository "$name" >"$W/$name.$role" 2>/dev/null
  done
  RUST_LOG=warn "$KURA" serve -c "$W/$name.toml" >"$W/$name.out" 2>"$W/$name.log" &
  PID=$!; PIDS+=("$PID")
  for _ in $(seq 100); do grep -q fingerprint "$W/$name.out" 2>/dev/null && break; sleep 0.1; done
  ADDR=$(grep -o 'https://[0-9.:]*' "$W/$name.out" | sed 's|https://||'); FP=$(grep -o 'sha256:[0-9a-f]*' "$W/$name.out")
}

# The source: 30 snapshots of one path, each after a deterministic change of ~0.5% of the files.
serve src ""
SRC_ADDR=$ADDR SRC_FP=$FP SRC_PID=$PID
SRC_URL="kura://$SRC_ADDR/src"
KURA_FINGERPRINT=$SRC_FP "$KURA" -r "$SRC_URL" --token-file "$W/src.admin" init -q
restic -r "$W/restic-src" init -q >/dev/null
TREE="$W/tree"; cp -a "$BENCH_DIR/linux" "$TREE"
find "$TREE" -type f | sort >"$W/files"
change() { # step
  awk -v s="$1" 'NR % 200 == s % 200' "$W/files" | while read -r f; do printf 'change %s\n' "$1" >>"$f"; done
}
snapshot() { # step
  KURA_FINGERPRINT=$SRC_FP "$KURA" -r "$SRC_URL" --token-file "$W/src.backup" backup -q --host bench "$TREE"
  restic -r "$W/restic-src" backup -q --host bench "$TREE" >/dev/null
}
echo "making $SNAPSHOTS snapshots of the tree in kura and restic..."
for i in $(seq 1 "$SNAPSHOTS"); do
  [ "$i" -gt 1 ] && change "$i"
  snapshot "$i"
done
SRC_BYTES=$(du -sb "$W/src-state/repos/src/data" | cut -f1)
RESTIC_SRC_BYTES=$(du -sb "$W/restic-src/data" | cut -f1)
echo "source: kura packs $SRC_BYTES bytes, restic packs $RESTIC_SRC_BYTES bytes"
find "$W/src-state/repos/src" "$W/restic-src" -type f -print0 | xargs -0 cat >/dev/null

# pull_job NAME ROUND STEP: runs the replica's pull job now, timed; logs its message.
pull_job() {
  measure kura "$3" "$2" curl -sS --fail-with-body --cacert /dev/null -k -X POST \
    -H "Authorization: Bearer $(cat "$W/$1.admin")" "https://$ADDR/v1/$1/jobs/pull"
  cat "$W/kura-$3.log" >>"$W/pull-messages.log"; echo >>"$W/pull-messages.log"
}

for r in $(seq 1 "$ROUNDS"); do
  # kura: a fresh replica server pulls everything, then one more snapshot.
  rm -rf "$D/dst-state" "$W"/dst.admin "$W"/dst.backup "$W"/dst.read
  du -sb "$W/src-state/repos/src/data" | cut -f1 >"$W/src-bytes.$r"
  printf '%s\n' "$(cat "$W/src.read")" >"$W/src.read.token"
  serve dst "[repository.pull]
schedule = \"daily 03:00\"
from = \"$SRC_URL\"
token-file = \"$W/src.read.token\"
fingerprint = \"$SRC_FP\"" "$D"
  DST_PID=$PID
  SERVER_PID=$DST_PID pull_job dst "$r" pull-full
  # a plain local copy of the same pack bytes
  rm -rf "$D/cp"
  measure cp copy-full "$r" sh -c "cp -a '$W/src-state/repos/src/data' '$D/cp' && sync"
  rm -rf "$D/cp"
  # kura copy: every blob read, re-encrypted under another key (as restic copy does)
  rm -rf "$D/kura-copy"; "$KURA" -r "$D/kura-copy" init -q
  measure kura-copy copy-full "$r" "$KURA" -q -r "$D/kura-copy" copy --from-repo "$W/src-state/repos/src"
  # restic copy of the same 30 snapshots into a repository with the same chunker parameters
  rm -rf "$W/restic-dst"
  restic -r "$W/restic-dst" init -q --from-repo "$W/restic-src" --copy-chunker-params >/dev/null
  measure restic copy-full "$r" restic -r "$W/restic-dst" copy -q --from-repo "$W/restic-src"
  du -sb "$W/restic-dst/data" | cut -f1 >"$W/restic-dst-bytes.$r"
  # one more snapshot, pulled / copied incrementally
  change "$((SNAPSHOTS + r))"
  snapshot "$((SNAPSHOTS + r))"
  SERVER_PID=$DST_PID pull_job dst "$r" pull-incremental
  measure kura-copy copy-incremental "$r" "$KURA" -q -r "$D/kura-copy" copy --from-repo "$W/src-state/repos/src"
  measure restic copy-incremental "$r" restic -r "$W/restic-dst" copy -q --from-repo "$W/restic-src"
  du -sb "$D/dst-state/repos/dst/data" | cut -f1 >"$W/dst-bytes.$r"
  KURA_FINGERPRINT=$FP "$KURA" -r "kura://$ADDR/dst" --token-file "$W/dst.read" snapshots -q | tail -1 >"$W/dst-snapshots.$r" || true
  kill "$DST_PID"; wait "$DST_PID" 2>/dev/null || true
  rm -rf "$D/kura-copy" "$D/dst-state"
done

python3 - "$OUT" "$W" "$SRC_BYTES" "$RESTIC_SRC_BYTES" <<'EOF'
import csv, re, statistics, sys, glob
out, w, src_bytes, restic_src = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = list(csv.DictReader(open(out), delimiter='\t'))
def med(tool, step, col='wall_s'):
    v = [float(r[col]) for r in rows if r['tool'] == tool and r['step'] == step]
    return statistics.median(v) if v else float('nan')
msgs = open(f'{w}/pull-messages.log').read()
fetched = [int(x) for x in re.findall(r'(\d+) bytes fetched', msgs)]
full = fetched[0::2]; inc = fetched[1::2]
srcs = [int(open(f).read()) for f in sorted(glob.glob(f'{w}/src-bytes.*'))]
print(f"source: {src_bytes/1e6:.1f} MB of kura packs (the unique data, compressed); restic {restic_src/1e6:.1f} MB")
print(f"kura bytes fetched, full pull: {[round(f/1e6,1) for f in full]} MB = {[round(f/s,4) for f, s in zip(full, srcs)]}x the source's packs at that time")
print(f"kura bytes fetched, incremental pull: {[round(f/1e6,2) for f in inc]} MB")
print()
print("step                     median wall s   CPU s (client)  puller CPU s")
for tool, step in [('kura','pull-full'),('cp','copy-full'),('kura-copy','copy-full'),('restic','copy-full'),('kura','pull-incremental'),('kura-copy','copy-incremental'),('restic','copy-incremental')]:
    print(f"{tool+' '+step:24} {med(tool,step):14.2f} {med(tool,step,'cpu_s'):14.2f} {med(tool,step,'server_cpu_s'):12.2f}")
print()
print(f"pull/cp (full): {med('kura','pull-full')/med('cp','copy-full'):.2f}  (target <= 1.5)")
print(f"kura pull / restic copy (full): {med('kura','pull-full')/med('restic','copy-full'):.3f}")
print(f"kura pull / restic copy (incremental): {med('kura','pull-incremental')/med('restic','copy-incremental'):.3f}")
print(f"kura copy / restic copy (full): {med('kura-copy','copy-full')/med('restic','copy-full'):.3f}; incremental: {med('kura-copy','copy-incremental')/med('restic','copy-incremental'):.3f}")
EOF
