#!/usr/bin/env bash
# GPT-1's auxiliary objective on chitchat (README, "Model families"): from the shipped model, the same
# SFT run twice, without and with `--aux-lm 0.5`, then the held-out figures of both: the assistant
# tokens' perplexity (what SFT learns), the other tokens' (what --aux-lm keeps), `parley eval`'s
# whole-text perplexity, and greedy replies to the first held-out prompts.
# Usage: benchmarks/aux_lm.sh [OUT_DIR] [STEPS]   (default: aux-lm 150)
set -euo pipefail
out=${1:-aux-lm}
steps=${2:-150}
parley="${PARLEY:-.venv/bin/parley}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
for lam in 0 0.5; do
  [ -f "$out/aux-$lam/config.json" ] && continue   # trained by an earlier run of this script
  start=$(date +%s)
  "$parley" train sft --model assets/default-model --out "$out/aux-$lam" --aux-lm "$lam" --max-steps "$steps" \
    --batch-size 16 --seq-len 256 --lr 3e-4 --warmup-steps 10 --eval-every "$steps" --eval-batches 20 \
    --save-every "$steps" --no-store 2>&1 | tail -1 | tee "$out/aux-$lam.log"
  echo "aux-lm $lam: $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"
done
# the last progress line holds eval_loss (assistant tokens) and eval_lm_loss (the others)
"$python" - "$out" <<'PY'
import math, re, sys
for lam in ("0", "0.5"):
    line = open(f"{sys.argv[1]}/aux-{lam}.log").read()
    assistant, other = (float(re.search(rf"\b{k} ([0-9.]+)", line).group(1)) for k in ("eval_loss", "eval_lm_loss"))
    print(f"--aux-lm {lam}: held-out ppl/token, assistant tokens {math.exp(assistant):.2f}, "
          f"other tokens {math.exp(other):.2f}")
PY
"$parley" eval --model assets/default-model --model "$out/aux-0" --model "$out/aux-0.5"
"$python" -c "
from engine import data
_, heldout = data.load('chitchat')
for c in heldout[:3]: print(c[0]['content'].replace('\n', ' '))" | while read -r prompt; do
  echo "prompt: $prompt"
  for m in assets/default-model "$out/aux-0" "$out/aux-0.5"; do
    echo "  $m: $("$parley" generate --model "$m" --temperature 0 --max-new-tokens 40 --prompt "$prompt" | tr '\n' ' ')"
  done
done
