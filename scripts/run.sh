#!/usr/bin/env bash
# The main job on a fresh machine: set up, train the CPU preset on Multi30K en-de within a short
# wall-clock budget, translate a few sentences, print the test BLEU, then serve the model over
# gRPC and translate through the client.
#   MINUTES   training budget (default 10; the reported results use 116)
#   RUN       run folder (default runs/quickstart)
#   PORT      gRPC port for the serving demo (default 50051)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${MINUTES:-10}"
run="${RUN:-runs/quickstart}"
port="${PORT:-50051}"
# training and serving: the `train` and `serve` extras (pyproject.toml)
.venv/bin/python -c "import datasets, grpc, matplotlib, sacrebleu" 2>/dev/null || bash scripts/setup.sh .venv train,serve
export PATH="$PWD/.venv/bin:$PATH"

nmt-train --config cpu --out "$run" --max-minutes "$minutes" train.valid_every=100
nmt-plot "$run" --out "$run/curves.png"

echo "--- translating a few sentences with $run/best.pt"
printf '%s\n' "A man in an orange hat starring at something." \
  "Two young children are playing in the sand." \
  "A woman is riding a bicycle down the street." | nmt-translate --checkpoint "$run/best.pt"

echo "--- Multi30K test_2016_flickr, greedy"
nmt-evaluate "$run/best.pt" --test multi30k:test_2016_flickr --beam-size 1

echo "--- serving $run/best.pt on localhost:$port and translating through the gRPC client"
nmt-serve --checkpoint "$run/best.pt" --host 127.0.0.1 --port "$port" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 120); do
  python deploy/healthcheck.py "127.0.0.1:$port" --timeout 1 >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "nmt-serve exited before serving" >&2; exit 1; }
  sleep 1
done
printf '%s\n' "A little girl climbs into a wooden playhouse." \
  "A black dog and a spotted dog are fighting." | nmt-translate --server "127.0.0.1:$port" --beam-size 5
