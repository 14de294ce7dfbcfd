"""RLHF on the shipped model with a hidden rule: the preferred reply is the shorter one.

    python benchmarks/rlhf_demo.py [--prompts 240] [--out DIR]

Samples 4 candidates per chitchat prompt from the default model, ranks them by length (ties give
no pair), trains a reward model, then PPO and DPO from the default model, and prints held-out
figures: reward-model pair accuracy, mean reward and length of fresh samples before and after
PPO with the KL it took, and DPO's chosen-over-rejected margin.
"""
import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa: E402
from engine import data  # noqa: E402
from engine.generate import generate  # noqa: E402
from engine.registry import resolve_model  # noqa: E402
from engine.rlhf.dpo import train_dpo  # noqa: E402
from engine.rlhf.ppo import mean_reward, train_ppo  # noqa: E402
from engine.rlhf.reward_model import load_reward_model, train_reward_model  # noqa: E402
from engine.sampling import Settings  # noqa: E402
from engine.store import Store  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp())
    base = str(resolve_model(None))
    lm = engine.load(base, device="cpu")
    train, heldout = data.load("chitchat")
    prompts = [[c[0]] for c in train[:args.prompts]]
    test_prompts = [[c[0]] for c in heldout[:48]]
    t0 = time.perf_counter()
    lines = []
    for i, prompt in enumerate(prompts):
        replies = generate(lm, lm.tokenizer.encode_chat(prompt), [Settings(seed=4 * i + k, max_new_tokens=40)
                                                                  for k in range(4)], top_alternatives=0)
        texts = sorted({r.text.strip() for r in replies if r.text.strip()}, key=lambda t: len(t.split()))
        for a, b in itertools.combinations(texts, 2):
            if len(a.split()) < len(b.split()):   # the hidden rule; equal lengths tie and give no pair
                lines.append({"prompt": prompt, "chosen": a, "rejected": b})
    (out / "prefs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"{len(lines)} preference pairs from {len(prompts)} prompts x 4 samples ({time.perf_counter() - t0:.0f} s)")

    with Store(out / "parley.db") as store:
        train_reward_model(base, str(out / "prefs.jsonl"), str(out / "rm"), max_steps=150, lr=3e-4, device="cpu",
                           eval_every=50, store=store)
        rm_run = store.runs()[0]["id"]
        accuracy = [(m["step"], round(m["value"], 3)) for m in store.metrics(rm_run, "eval_accuracy")]
        rm = load_reward_model(out / "rm", device="cpu")

        def length(model_lm):
            lengths = []
            for i, p in enumerate(test_prompts):
                r = generate(model_lm, model_lm.tokenizer.encode_chat(p), Settings(temperature=1.0, top_k=0, top_p=1.0,
                             min_p=0.0, seed=7 + i, max_new_tokens=32), top_alternatives=0)[0]
                lengths.append(len(r.text.split()))
            return sum(lengths) / len(lengths)

        before = mean_reward(lm, rm, test_prompts, seed=7)
        before_len = length(lm)
        train_ppo(base, str(out / "rm"), str(out / "ppo"), prompts=str(out / "prompts.jsonl"), max_steps=25,
                  batch_size=16, minibatch_size=8, lr=2e-5, beta=0.05, max_new_tokens=32, device="cpu", store=store)
        ppo_run = store.runs()[0]["id"]
        kl = [round(m["value"], 2) for m in store.metrics(ppo_run, "kl")]
        reward_curve = [round(m["value"], 2) for m in store.metrics(ppo_run, "reward")]
        tuned = engine.load(out / "ppo", device="cpu")
        after = mean_reward(tuned, rm, test_prompts, seed=7)
        after_len = length(tuned)
        train_dpo(base, str(out / "prefs.jsonl"), str(out / "dpo"), max_steps=60, lr=5e-5, device="cpu",
                  eval_every=20, store=store)
        dpo_run = store.runs()[0]["id"]
        margins = [(m["step"], round(m["value"], 3)) for m in store.metrics(dpo_run, "eval_margin")]
        dpo_acc = [(m["step"], round(m["value"], 3)) for m in store.metrics(dpo_run, "eval_reward_accuracy")]
    print(f"reward model held-out pair accuracy by step: {accuracy}")
    print(f"PPO reward per step: {reward_curve}")
    print(f"PPO KL per step: {kl}")
    print(f"held-out fresh samples: mean reward {before:.3f} -> {after:.3f}, mean length {before_len:.1f} -> "
          f"{after_len:.1f} words")
    print(f"DPO held-out margin by step: {margins}; reward accuracy: {dpo_acc}")
    print(f"total {time.perf_counter() - t0:.0f} s; files in {out}")


if __name__ == "__main__":
    main()
