#!/usr/bin/env bash
# The main job on a fresh machine: set up, train the CPU preset on Multi30K en-de within a short
# wall-clock budget, translate a few sentences, and print the test BLEU.
#   MINUTES   training budget (default 10; the reported results use 115)
#   RUN       run folder (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${MINUTES:-10}"
run="${RUN:-runs/quickstart}"
[ -x .venv/bin/nmt-train ] || bash scripts/setup.sh .venv
export PATH="$PWD/.venv/bin:$PATH"

nmt-train --config cpu --out "$run" --max-minutes "$minutes" train.valid_every=100
nmt-plot "$run" --out "$run/curves.png"

echo "--- translating a few sentences with $run/best.pt"
printf '%s\n' "A man in an orange hat starring at something." \
  "Two young children are playing in the sand." \
  "A woman is riding a bicycle down the street." | nmt-translate --checkpoint "$run/best.pt"

echo "--- Multi30K test_2016_flickr, greedy"
nmt-evaluate "$run/best.pt" --test multi30k:test_2016_flickr --beam-size 1
