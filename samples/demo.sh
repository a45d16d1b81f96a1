#!/usr/bin/env bash
# deltalog end to end on the bundled sample: set up, build a model, train it
# a little, and inspect, diff, sync, roll back, replay, compact, serve and
# verify its replicas. Everything it writes goes under samples/work/ (deleted first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
W=samples/work
rm -rf "$W" && mkdir -p "$W"
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
# diff exits 1 when states differ and sync exits 1 when a budget stopped it: expected here.
say1() { printf '\n\033[1m$ %s\033[0m\n' "$*"; local rc=0; "$@" || rc=$?; [ "$rc" -le 1 ] || exit "$rc"; echo "(exit $rc)"; }
# A refusal the demo provokes on purpose: the command must exit with exactly this code.
refused() { local want=$1; shift; printf '\n\033[1m$ %s\033[0m\n' "$*"; local rc=0; "$@" || rc=$?
    [ "$rc" = "$want" ] || { echo "expected exit $want, got $rc"; exit 1; }; echo "(exit $rc, as expected)"; }

say python samples/make_model.py $W/model.safetensors
say deltalog init $W/primary --from $W/model.safetensors --bucket-rows 256 --model-id sample-recsys
# A training loop commits the rows each optimizer step touched (Python API).
say python samples/update_stream.py $W/primary --steps 20
# A batch job exports full checkpoints; commit stores only the rows that changed.
say python samples/update_stream.py $W/primary --steps 5 --seed 2 --checkpoint-out $W/next.safetensors
say deltalog commit $W/primary --from $W/next.safetensors
say deltalog status $W/primary
say deltalog log $W/primary --limit 5

# What did the last ten updates change? (only the rows the log says were written since)
say1 deltalog diff $W/primary@11 $W/primary --top 3

# A serving replica: created from a snapshot plus the log, then kept fresh with deltas.
say deltalog sync $W/primary $W/serving
say python samples/update_stream.py $W/primary --steps 10 --seed 3
say1 deltalog sync $W/primary $W/serving --max-bytes 300K   # most significant buckets first
say deltalog status $W/serving
say deltalog sync $W/primary $W/serving
say deltalog diff $W/primary $W/serving

# Incident: offset 31 hurt the model. Roll back (a record too) and carry it downstream.
say deltalog rollback $W/primary --to 30 --reason "CTR dropped after offset 31"
say deltalog sync $W/primary $W/serving
say deltalog log $W/serving --limit 2   # the rollback shows as a rollback, with its reason

# A stray write on the serving replica makes it another model at offsets the primary
# will write next: sync refuses it (exit 13) instead of mixing histories.
say python samples/update_stream.py $W/serving --steps 1 --seed 9
say python samples/update_stream.py $W/primary --steps 2 --seed 4
refused 13 deltalog sync $W/primary $W/serving
say deltalog sync $W/primary $W/serving --reseed
say deltalog diff $W/primary $W/serving   # equal state digests: identical, nothing read
say deltalog replay $W/primary --to 25 --out $W/model-at-25.safetensors

# Bounded storage: fold all but the last 5 records into a snapshot.
say deltalog compact $W/primary --keep-records 5

# Serve over HTTP (127.0.0.1, a free port): plain curl gets a checkpoint, sync pulls deltas.
deltalog serve-snapshot $W/primary --port 0 --quiet 2> $W/serve.log &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "serving" $W/serve.log 2>/dev/null && break; sleep 0.1; done
URL=$(grep -o 'http://[0-9.:]*' $W/serve.log | head -1)
if command -v curl >/dev/null; then
    say curl -sS -o $W/latest.safetensors "$URL/v1/snapshot/latest"
    # the newest snapshot is the compaction's: the oldest retained offset
    OLDEST=$(deltalog status $W/primary --json | python -c 'import json,sys; print(json.load(sys.stdin)["oldest_offset"])')
    say deltalog diff $W/latest.safetensors "$W/primary@$OLDEST"
fi
say deltalog sync "$URL" $W/edge
say deltalog diff $W/primary $W/edge
kill $SERVER

# A fleet pulls from object storage instead (here a directory, file://; s3://, gs://, az:// the same):
# the primary publishes once, any number of replicas pull, read-only.
say deltalog sync $W/primary file://$W/relay
say deltalog sync file://$W/relay $W/fleet-1
say python samples/update_stream.py $W/primary --steps 3 --seed 5
say deltalog sync $W/primary file://$W/relay
say deltalog sync file://$W/relay $W/fleet-1
say deltalog diff $W/primary $W/fleet-1

say deltalog verify $W/primary
say deltalog verify $W/serving
echo
echo "demo finished: replicas are in $W/"
