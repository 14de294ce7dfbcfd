"""RLHF on the shipped model with a rule it rarely follows at first: the preferred reply asks the
user a question back (it contains "?"). PPO, RLOO, GRPO and DPO side by side, with the defaults.

    python benchmarks/rlhf_demo.py [--prompts 400] [--steps 60] [--out DIR]

Samples 4 replies per chitchat prompt from the default model, makes a pair of every question and
non-question among them, trains a reward model, then each method from the default model with
its default settings (only the number of steps is set), and prints, per method, the curve of
reward, KL and reply length over the steps, and on held-out prompts: how often replies follow the
rule, the reward, the KL to the starting model, the mean length in words and the reference
model's perplexity of the replies; and a few replies before and after.

A short degenerate reply ("What?") follows the rule too, so this shows whether a method learns
the rule or collapses onto the shortest reply that scores.
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
from engine.registry import resolve_model  # noqa: E402
from engine.rlhf.dpo import train_dpo  # noqa: E402
from engine.rlhf.group import train_group  # noqa: E402
from engine.rlhf.ppo import train_ppo  # noqa: E402
from engine.rlhf.reward_model import load_reward_model, train_reward_model  # noqa: E402
from engine.train.config import DPOConfig, GRPOConfig, PPOConfig, RewardModelConfig, RLOOConfig  # noqa: E402
from engine.rlhf.rollout import Sampling, held_out, rollout  # noqa: E402
from engine.store import Store  # noqa: E402


def follows(text: str) -> bool:
    return "?" in text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--methods", default="ppo,rloo,grpo,dpo")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    base = str(resolve_model(None))
    lm = engine.load(base, device="cpu")
    train, heldout = data.load("chitchat")
    prompts = [[c[0]] for c in train[:args.prompts]]
    test_prompts = [[c[0]] for c in heldout[:64]]
    t0 = time.perf_counter()
    if not (out / "prefs.jsonl").exists():
        samples = rollout(lm, prompts, 4, Sampling(max_new_tokens=40), lm.max_context, seed=0)
        lines = []
        for i, prompt in enumerate(prompts):
            texts = sorted({t.strip() for t in samples.texts[4 * i:4 * i + 4] if t.strip()})
            for a, b in itertools.combinations(texts, 2):
                if follows(a) != follows(b):   # the rule; two questions or two non-questions give no pair
                    chosen, rejected = (a, b) if follows(a) else (b, a)
                    lines.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                                  "rejected": [{"role": "assistant", "content": rejected}]})
        (out / "prefs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        shorter = sum(len(x["chosen"][0]["content"].split()) < len(x["rejected"][0]["content"].split()) for x in lines)
        print(f"{len(lines)} preference pairs from {len(prompts)} prompts x 4 samples, the chosen reply shorter in "
              f"{shorter / len(lines):.0%} ({time.perf_counter() - t0:.0f} s)", flush=True)

    results = {}
    with Store(out / "parley.db") as store:
        if not (out / "rm" / "config.json").exists():
            train_reward_model(RewardModelConfig(base=base, prefs=str(out / "prefs.jsonl"), out=str(out / "rm"),
                                                 max_steps=150, lr=3e-4, device="cpu", eval_every=50), store)
        rm = load_reward_model(out / "rm", device="cpu")
        reference = engine.load(base, device="cpu").model
        evaluation = Sampling()
        results["start"] = measure(lm, reference, rm, test_prompts, evaluation)
        for method in args.methods.split(","):
            t1 = time.perf_counter()
            target = str(out / method)
            if method == "ppo":
                train_ppo(PPOConfig(policy=base, reward_model=str(out / "rm"), out=target,
                                    prompts=str(out / "prompts.jsonl"), max_steps=args.steps, device="cpu"), store)
            elif method in ("rloo", "grpo"):
                config = {"rloo": RLOOConfig, "grpo": GRPOConfig}[method]
                train_group(config(policy=base, reward_model=str(out / "rm"), out=target,
                                   prompts=str(out / "prompts.jsonl"), max_steps=args.steps, device="cpu"), store)
            else:
                train_dpo(DPOConfig(policy=base, prefs=str(out / "prefs.jsonl"), out=target, max_steps=args.steps,
                                    device="cpu"), store)
            run = store.runs()[0]["id"]
            curve = {name: [round(m["value"], 2) for m in store.metrics(run, name)]
                     for name in ("reward", "kl", "response_length", "loss")}
            results[method] = measure(engine.load(target, device="cpu"), reference, rm, test_prompts, evaluation)
            results[method]["curve"] = {k: v for k, v in curve.items() if v}
            results[method]["seconds"] = round(time.perf_counter() - t1)
            print(f"{method} done in {results[method]['seconds']} s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report(results)
    print(f"total {time.perf_counter() - t0:.0f} s; files in {out}")


def measure(model_lm, reference, rm, prompts, sampling: Sampling) -> dict:
    figures = held_out(model_lm, reference, rm, prompts, sampling, seed=7)
    replies = rollout(model_lm, prompts, 1, sampling, rm.max_len, seed=7).texts
    figures["follows"] = sum(map(follows, replies)) / len(replies)
    figures["samples"] = replies[:4]
    return figures


def report(results: dict) -> None:
    print("\n| model | follows the rule | held-out reward | KL to start | words | reference ppl | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['follows']:.0%} | {r['heldout_reward']:.2f} | {r['heldout_kl']:.2f} | "
              f"{r['heldout_length']:.1f} | {r['heldout_ref_ppl']:.1f} | {r.get('seconds', '')} |")
    for name, r in results.items():
        for key, values in r.get("curve", {}).items():
            print(f"{name} {key} per step: {values}")
    print("\nSamples (held-out prompts, seed 7):")
    for name, r in results.items():
        print(f"{name}: " + " | ".join(repr(s) for s in r["samples"]))


if __name__ == "__main__":
    main()
