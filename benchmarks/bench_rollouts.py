"""Rollout speed: many prompts in one Generation against one prompt, or one candidate, at a time.

    python benchmarks/bench_rollouts.py [--device cpu|cuda] [--model default] [--replies 4]
        [--new-tokens 32] [--repeats 3] [--threads N]

On the shipped default model, 16 chat prompts of varied length get 4 sampled replies each
(temperature 1, top_k 0, top_p 1, min_p 0, a fixed seed per reply), as an RLHF rollout draws them:
  (a) generate_batch: all 16 x 4 in one run (one padded prefill, 64 rows per step);
  (b) one prompt at a time, its 4 replies in one Generation;
  (c) one candidate at a time.
It prints rollout tokens/s of each (generated tokens over wall time, prefill included), the ratios
a/b and a/c, and whether (a) and (c) drew the same tokens. The three take turns (best of --repeats
each), so that a slow spell of a shared machine slows them alike.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa: E402
from engine.generate import generate, generate_batch  # noqa: E402
from engine.registry import resolve_model  # noqa: E402
from engine.settings import Settings  # noqa: E402

PROMPTS = [
    "hi!",
    "how are you?",
    "what did you do this weekend?",
    "do you like music?",
    "i just got back from a trip to the mountains with my family, it was great.",
    "what is your favourite food?",
    "i have been learning to play the guitar for a few months now and my fingers hurt a lot. any tips?",
    "tell me about your job.",
    "it is raining again here. i wanted to go for a walk in the park but i think i will stay home and read.",
    "do you have any pets?",
    "what kind of movies do you like to watch on a friday night?",
    ("my sister is getting married next month and i still have not found anything to wear. i am so nervous "
     "about giving a speech in front of everyone, what should i say?"),
    "good morning",
    "have you ever been to new york? i am thinking of visiting in the spring.",
    "i love cooking. last night i made pasta with a sauce from fresh tomatoes from my garden.",
    ("what are you up to today? i have a lot of work to do but i would rather be outside in the sun playing "
     "tennis with my friends, or maybe swimming in the lake near my house."),
]


def interleaved_best(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best time and last result of each function, run in turns (after one warm-up run of each)."""
    results = {name: fn() for name, fn in fns.items()}
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    parser.add_argument("--model", default="default", help="a model directory or known name")
    parser.add_argument("--replies", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = engine.load(resolve_model(args.model), device=args.device)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    prompts = [lm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    k = args.replies
    settings = [[Settings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=args.new_tokens,
                          seed=1000 + k * i + j) for j in range(k)] for i in range(len(prompts))]

    def batched():
        out = generate_batch(lm, prompts, settings)
        sync()
        return [[f.token_ids for f in row] for row in out]

    def per_prompt():
        out = [[f.token_ids for f in generate(lm, p, s)] for p, s in zip(prompts, settings)]
        sync()
        return out

    def per_candidate():
        out = [[generate(lm, p, [c])[0].token_ids for c in s] for p, s in zip(prompts, settings)]
        sync()
        return out

    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    lengths = [len(p) for p in prompts]
    print(f"{lm.path.name} on {lm.device} ({torch.get_num_threads()} threads{load}), {lm.dtype}: "
          f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens x {k} replies, "
          f"max {args.new_tokens} new tokens, best of {args.repeats}")
    best, results = interleaved_best({"a": batched, "b": per_prompt, "c": per_candidate}, args.repeats)
    tokens = {name: sum(len(ids) for row in out for ids in row) for name, out in results.items()}
    rate = {name: tokens[name] / best[name] for name in best}
    labels = {"a": f"(a) generate_batch, {len(prompts)} x {k} in one run",
              "b": f"(b) one prompt at a time, {k} replies each",
              "c": "(c) one candidate at a time"}
    for name, label in labels.items():
        print(f"{label:<44}{rate[name]:>9.1f} tok/s  ({tokens[name]} tokens in {best[name]:.2f} s)")
    print(f"a/b {rate['a'] / rate['b']:.2f}x   a/c {rate['a'] / rate['c']:.2f}x")
    same = results["a"] == results["c"]
    differ = sum(x != y for ra, rc in zip(results["a"], results["c"]) for x, y in zip(ra, rc))
    print("(a) and (c) drew identical tokens" if same else
          f"(a) and (c) differ in {differ} of {len(prompts) * k} replies")


if __name__ == "__main__":
    main()
