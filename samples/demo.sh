#!/usr/bin/env bash
# deltalog end to end on the bundled sample: set up, build a model, train it
# a little, and inspect, diff, sync, roll back and verify its replicas.
# Everything it writes goes under samples/work/ (deleted first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
W=samples/work
rm -rf "$W" && mkdir -p "$W"
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

say python samples/make_model.py $W/model.safetensors
say deltalog init $W/primary --from $W/model.safetensors --bucket-rows 256 --model-id sample-recsys
# A training loop commits the rows each optimizer step touched (Python API).
say python samples/update_stream.py $W/primary --steps 20
# A batch job exports full checkpoints; commit stores only the rows that changed.
say python samples/update_stream.py $W/primary --steps 5 --seed 2 --checkpoint-out $W/next.safetensors
say deltalog commit $W/primary --from $W/next.safetensors
say deltalog status $W/primary
say deltalog log $W/primary --limit 5
say deltalog verify $W/primary
echo
echo "demo finished: replicas are in $W/"
