#!/usr/bin/env bash
# Every row of the README's family table ("Model families"), in one run: trains each language-model
# family on chitchat with the shipped model's tokenizer and the same split, for the same number of
# steps, and prints `parley eval`'s table for all of them (training times in OUT_DIR/times.txt); then
# SFT with and without GPT-1's auxiliary LM loss (benchmarks/aux_lm.sh, 100 steps) and word2vec and
# ELMo on their tests' planted corpora (benchmarks/word_vectors.py).
# Usage: benchmarks/train_families.sh [OUT_DIR] [STEPS]   (default: families 400)
# A model already in OUT_DIR is kept, so an interrupted run goes on where it stopped.
set -euo pipefail
out=${1:-families}
steps=${2:-400}
parley="${PARLEY:-.venv/bin/parley}"
tok=assets/default-model
mkdir -p "$out"
declare -A lr=([nnlm]=1e-3 [rnn]=2e-3 [gru]=3e-3 [lstm]=3e-3 [gpt]=1e-3 [gpt-local]=1e-3 [gpt-dilated]=1e-3
               [gpt-strided]=1e-3 [gpt-fixed]=1e-3)
for preset in nnlm rnn gru lstm gpt gpt-local gpt-dilated gpt-strided gpt-fixed; do
  [ -f "$out/$preset/config.json" ] && continue   # trained by an earlier run of this script
  start=$(date +%s)
  "$parley" train pretrain --preset "$preset" --tokenizer "$tok" --out "$out/$preset" --max-steps "$steps" \
    --batch-size 16 --seq-len 256 --lr "${lr[$preset]}" --warmup-steps 40 --eval-every "$steps" --save-every "$steps" \
    --no-store 2>&1 | tail -1
  echo "$preset: $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"
done
for smoothing in add_k katz kneser_ney; do
  [ -f "$out/3gram-$smoothing/config.json" ] && continue
  start=$(date +%s)
  "$parley" train ngram --order 3 --smoothing "$smoothing" --tokenizer "$tok" --out "$out/3gram-$smoothing"
  echo "3gram-$smoothing: $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"
done
# BERT: masked-LM pretraining on the same data and tokenizer; `parley eval` gives its pseudo-perplexity
if [ ! -f "$out/bert/config.json" ]; then
  start=$(date +%s)
  "$parley" train mlm --tokenizer "$tok" --out "$out/bert" --max-steps "$steps" --batch-size 16 --seq-len 256 \
    --warmup-steps 40 --eval-every "$steps" --save-every "$steps" --no-store 2>&1 | tail -1
  echo "bert: $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"
fi
models=()
for m in "$out"/*/; do [ -f "$m/config.json" ] && [ "$m" != "$out/bert/" ] && models+=(--model "$m"); done
"$parley" eval "${models[@]}"
# pseudo-perplexity is a forward pass per token: BERT (and the shipped model beside it, for scale) on the
# first 10 held-out conversations (all 207 would be ~180,000 passes)
"$parley" eval --model "$out/bert" --model default --max-examples 10
benchmarks/aux_lm.sh "$out/aux-lm" 100
"${PYTHON:-.venv/bin/python}" benchmarks/word_vectors.py
