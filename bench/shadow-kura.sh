#!/usr/bin/env bash
# Stands in for lsyncd in ../shared/bench/shadow-peers.sh's fs-case (bench/shadow_kura.py starts
# it): a kura serve receiving stream "bench" into DST and a kura shadow push of SRC, both
# children of this script. Prints "Startup of kura finished" once the pusher is in sync and
# watching; SIGTERM stops both. Usage: shadow-kura.sh KURA SRC DST STATE
set -euo pipefail
KURA=$1 SRC=$2 DST=$3 STATE=$4
mkdir -p "$STATE"
cat >"$STATE/server.toml" <<TOML
listen = "127.0.0.1:0"
state_dir = "$STATE/state"
[[stream]]
name = "bench"
mirror = "$DST"
TOML
TOKEN=$("$KURA" serve -c "$STATE/server.toml" token add --role shadow --repository bench)
"$KURA" serve -c "$STATE/server.toml" >"$STATE/serve.out" 2>"$STATE/serve.log" &
SERVE=$!
PUSH=""
trap 'kill $PUSH $SERVE 2>/dev/null; wait; exit 0' TERM INT
for _ in $(seq 100); do grep -q fingerprint "$STATE/serve.out" 2>/dev/null && break; sleep 0.05; done
ADDR=$(grep -o 'https://[^ ]*' "$STATE/serve.out" | head -1 | sed 's|https://||')
FP=$(grep -o 'sha256:[0-9a-f]*' "$STATE/serve.out" | head -1)
export KURA_TOKEN=$TOKEN KURA_FINGERPRINT=$FP
"$KURA" shadow push --source "$SRC" --to "kura://$ADDR/bench" 2>"$STATE/push.log" &
PUSH=$!
echo "$SERVE" >"$STATE/serve.pid"; echo "$PUSH" >"$STATE/push.pid"
for _ in $(seq 1200); do grep -q "in sync with the standby" "$STATE/push.log" 2>/dev/null && break; sleep 0.05; done
# The initial tree on the mirror too (the harness watches its folders).
HEAD=$("$KURA" --json shadow status --to "kura://$ADDR/bench" | python3 -c 'import json,sys; print(json.load(sys.stdin)["head"])')
"$KURA" shadow wait "$HEAD" --to "kura://$ADDR/bench" --timeout 120s
echo "Startup of kura finished"
wait
