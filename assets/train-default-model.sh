#!/usr/bin/env bash
# Rebuilds assets/default-model from scratch with Parley's own pipeline (see assets/README.md).
# Run from an empty working directory with Parley installed; add --device cuda (and drop
# --autocast bf16, which is the default there) to train on a GPU.
set -euo pipefail
parley train tokenizer --data chitchat --vocab-size 4096 --out tok
parley train pretrain --preset chat-6m --tokenizer tok --data chitchat --out pre --max-steps 900 --batch-size 32 \
    --seq-len 256 --lr 2e-3 --warmup-steps 50 --eval-every 100 --eval-batches 5 --save-every 100 --seed 0 --autocast bf16
parley train sft --model pre --data chitchat --out sft --max-steps 200 --batch-size 32 --seq-len 256 --lr 5e-4 \
    --warmup-steps 20 --eval-every 50 --eval-batches 5 --save-every 50 --seed 0 --autocast bf16
parley train ngram --order 3 --smoothing kneser_ney --tokenizer tok --data chitchat --out kn3
parley eval --model sft
parley eval --model kn3
mkdir -p default-model
for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
    cp "sft/$f" default-model/
done
