"""The reward model learns a hidden preference rule from pairs, saves, loads and scores."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine import ParleyError
from engine.rlhf.prefs import preference_groups
from engine.rlhf.reward_model import load_reward_model, train_reward_model
from engine.store import Store
from engine.train.tokenizer import train_tokenizer
from engine.train.config import DPOConfig, GRPOConfig, PPOConfig, RewardModelConfig, RLOOConfig, SFTConfig
from engine.train.trainer import train

DRINKS = ["tea", "coffee", "juice", "water", "milk", "soda"]


def rows(n, seed=0):
    """Preferences by a hidden rule: the reply that mentions tea is preferred."""
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        other = rng.choice(DRINKS[1:])
        tea = rng.choice(["I would have some tea.", "Tea is nice today.", "Maybe a cup of tea?"])
        plain = rng.choice([f"I would have some {other}.", f"{other.title()} is nice today.",
                            f"Maybe a cup of {other}?"])
        out.append({"prompt": [{"role": "user", "content": f"What should I drink, friend number {i}?"}],
                    "chosen": [{"role": "assistant", "content": tea}],
                    "rejected": [{"role": "assistant", "content": plain}]})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    lines = rows(400)
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    chats = [{"messages": r["prompt"] + r["chosen"]} for r in lines] + [{"messages": r["prompt"] + r["rejected"]}
                                                                        for r in lines]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    train_tokenizer([c["messages"] for c in chats], 400).save(root / "tok")
    train(SFTConfig(out=str(root / "sft"), data=str(root / "chat.jsonl"), preset="tiny",
                      tokenizer=str(root / "tok"), seq_len=48, batch_size=16, lr=3e-3, warmup_steps=5,
                      max_steps=40, eval_every=40, save_every=40, device="cpu"))
    return root


def test_reward_model_learns_the_hidden_rule(base, tmp_path):
    with Store(tmp_path / "parley.db") as store:
        rm = train_reward_model(RewardModelConfig(base=str(base / "sft"), prefs=str(base / "prefs.jsonl"),
                                                  out=str(tmp_path / "rm"), max_steps=60, lr=3e-3, seed=0, device="cpu",
                                                  eval_every=30), store)
        run = store.runs()[0]
        accuracy = store.metrics(run["id"], "eval_accuracy")[-1]["value"]
        assert run["kind"] == "rm" and run["status"] == "finished"
    assert accuracy >= 0.9
    loaded = load_reward_model(tmp_path / "rm", device="cpu")
    prompt = [{"role": "user", "content": "What should I drink, friend number 9999?"}]
    tea, juice = loaded.rewards([(prompt, "Maybe a cup of tea?"), (prompt, "Maybe a cup of juice?")])
    assert tea > juice
    assert loaded.rewards([(prompt, "Maybe a cup of tea?")]) == pytest.approx(rm.rewards([(prompt, "Maybe a cup of tea?")]),
                                                                             abs=1e-5)


def test_transformers_reads_the_reward_model(base, tmp_path):
    from transformers import AutoModelForSequenceClassification
    rm = train_reward_model(RewardModelConfig(base=str(base / "sft"), prefs=str(base / "prefs.jsonl"),
                                              out=str(tmp_path / "rm"), max_steps=3, device="cpu", normalise_samples=2))
    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    prompt = [{"role": "user", "content": "hi"}]
    ids = rm.encode(prompt, "Tea is nice today.")
    with torch.no_grad():
        expected = (ref(torch.tensor([ids])).logits[0, 0].item() - rm.model.offset) / rm.model.scale
    assert rm.rewards([(prompt, "Tea is nice today.")])[0] == pytest.approx(expected, abs=1e-4)


def test_score_command_and_bad_input(base, tmp_path):
    train_reward_model(RewardModelConfig(base=str(base / "sft"), prefs=str(base / "prefs.jsonl"), out=str(tmp_path / "rm"),
                                         max_steps=2, device="cpu", normalise_samples=2))
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hi", "response": "Tea is nice today."}) + "\n" +
                                       json.dumps(rows(1)[0]) + "\n")
    run = subprocess.run([sys.executable, "-m", "tui_app", "score", "--reward-model", str(tmp_path / "rm"),
                          str(tmp_path / "in.jsonl"), "--device", "cpu"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.splitlines()
    float(first)
    assert set(json.loads(second)) == {"chosen", "rejected"}
    with pytest.raises(ParleyError, match=r"prefs\.jsonl:2: chosen is empty"):
        (tmp_path / "prefs.jsonl").write_text(json.dumps(rows(1)[0]) + "\n" +
                                              json.dumps({"prompt": "x", "chosen": "", "rejected": "y"}) + "\n")
        preference_groups(str(tmp_path / "prefs.jsonl"))
    with pytest.raises(ParleyError, match="is not a reward model"):
        load_reward_model(base / "sft")


def test_dpo_raises_the_chosen_over_rejected_margin(base, tmp_path):
    from engine.rlhf.dpo import train_dpo
    with Store(tmp_path / "parley.db") as store:
        train_dpo(DPOConfig(policy=str(base / "sft"), prefs=str(base / "prefs.jsonl"), out=str(tmp_path / "dpo"),
                            max_steps=30, lr=1e-3, device="cpu", eval_every=15), store)
        run = store.runs()[0]
        margins = [m["value"] for m in store.metrics(run["id"], "eval_margin")]
        accuracy = store.metrics(run["id"], "eval_reward_accuracy")[-1]["value"]
        assert run["kind"] == "dpo" and run["status"] == "finished" and store.model("dpo") is not None
    assert margins[-1] > margins[0] > 0 and accuracy >= 0.9
    # the trained policy prefers the tea replies more than the reference does
    import engine
    from engine.rlhf.dpo import sequence_logprobs
    from engine.rlhf.prefs import reply_ids
    prompt = [{"role": "user", "content": "What should I drink, friend number 5000?"}]
    tokenizer = engine.load(base / "sft").tokenizer
    rows = [reply_ids(tokenizer, prompt, reply) for reply in ["Maybe a cup of tea?", "Maybe a cup of soda?"]]
    with torch.no_grad():
        after = sequence_logprobs(engine.load(tmp_path / "dpo", device="cpu").model, rows, tokenizer.pad_token_id)
        before = sequence_logprobs(engine.load(base / "sft", device="cpu").model, rows, tokenizer.pad_token_id)
    assert (after[0] - after[1]) > (before[0] - before[1])


@pytest.fixture(scope="module")
def reward_dir(base):
    """A reward model trained on the hidden rule, and the PPO prompts file beside it."""
    train_reward_model(RewardModelConfig(base=str(base / "sft"), prefs=str(base / "prefs.jsonl"), out=str(base / "rm"),
                                         max_steps=60, lr=3e-3, device="cpu", eval_every=60, normalise_samples=32))
    prompts = [[{"role": "user", "content": f"What should I drink, friend number {i}?"}] for i in range(150)]
    (base / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return base / "rm"


def test_ppo_raises_the_reward_of_fresh_samples_with_bounded_kl(base, reward_dir, tmp_path):
    import engine
    from engine.rlhf.ppo import mean_reward, train_ppo
    rm = load_reward_model(reward_dir, device="cpu")
    heldout = [[{"role": "user", "content": f"What should I drink, friend number {i}?"}] for i in range(150, 200)]
    before = mean_reward(engine.load(base / "sft", device="cpu"), rm, heldout, seed=7)
    with Store(tmp_path / "parley.db") as store:
        train_ppo(PPOConfig(policy=str(base / "sft"), reward_model=str(reward_dir), out=str(tmp_path / "ppo"),
                            prompts=str(base / "prompts.jsonl"), max_steps=12, batch_size=16, minibatch_size=8, lr=3e-4,
                            beta=0.05, max_new_tokens=16, device="cpu"), store)
        run = store.runs()[0]
        kls = [m["value"] for m in store.metrics(run["id"], "kl")]
        names = {m["name"] for m in store.metrics(run["id"])}
        assert run["kind"] == "ppo" and run["status"] == "finished" and store.model("ppo") is not None
        approx_kl = [m["value"] for m in store.metrics(run["id"], "approx_kl")]
    assert names >= {"reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "response_length",
                     "heldout_reward", "heldout_kl", "heldout_length", "heldout_ref_ppl", "actor_grad_norm",
                     "critic_grad_norm"}
    assert max(approx_kl) > 0   # the ratio is the new policy's over the rollout's
    after = mean_reward(engine.load(tmp_path / "ppo", device="cpu"), rm, heldout, seed=7)
    print(f"held-out mean reward {before:.3f} -> {after:.3f}; KL per step {[round(k, 2) for k in kls]}")
    assert after > before + 0.5
    assert max(kls) < 8.0


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_rloo_and_grpo_raise_the_reward_of_fresh_samples(base, reward_dir, tmp_path, method):
    import engine
    from engine.rlhf.group import train_group
    from engine.rlhf.ppo import mean_reward
    rm = load_reward_model(reward_dir, device="cpu")
    heldout = [[{"role": "user", "content": f"What should I drink, friend number {i}?"}] for i in range(150, 200)]
    before = mean_reward(engine.load(base / "sft", device="cpu"), rm, heldout, seed=7)
    with Store(tmp_path / "parley.db") as store:
        config = {"rloo": RLOOConfig, "grpo": GRPOConfig}[method]
        train_group(config(policy=str(base / "sft"), reward_model=str(reward_dir), out=str(tmp_path / method),
                           prompts=str(base / "prompts.jsonl"), max_steps=12, prompts_per_step=8, replies=4, epochs=2,
                           lr=3e-4, max_new_tokens=16, eval_every=6, device="cpu"), store)
        run = store.runs()[0]
        names = {m["name"] for m in store.metrics(run["id"])}
        kls = [m["value"] for m in store.metrics(run["id"], "kl")]
        assert run["kind"] == method and run["status"] == "finished" and store.model(method) is not None
    assert names >= {"reward", "kl", "response_length", "policy_loss", "heldout_reward", "heldout_kl",
                     "heldout_length", "heldout_ref_ppl"}
    after = mean_reward(engine.load(tmp_path / method, device="cpu"), rm, heldout, seed=7)
    print(f"{method}: held-out mean reward {before:.3f} -> {after:.3f}; KL per step {[round(k, 2) for k in kls]}")
    assert after > before + 0.5
    assert max(kls) < 8.0


def test_rewards_are_normalised_on_the_base_policys_own_samples(base, tmp_path):
    """Mean 0 and standard deviation 1 on fresh samples of the SFT policy at the rollout settings
    (not on samples of the backbone trained into a reward model, which are junk)."""
    from engine.rlhf.rollout import Sampling, rollout, scores
    import engine
    rm = train_reward_model(RewardModelConfig(base=str(base / "sft"), prefs=str(base / "prefs.jsonl"),
                                              out=str(tmp_path / "rm"), max_steps=60, lr=3e-3, device="cpu", eval_every=60,
                                              normalise_samples=48, reward_scale=True))
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["parley_reward_normalised_at"] == Sampling().to_dict() and config["parley_max_length"] == 256
    assert config["parley_reward_scale"] == rm.model.scale != 1.0
    prompts = [[{"role": "user", "content": f"What should I drink, friend number {i}?"}] for i in range(400, 464)]
    fresh = scores(rm, rollout(engine.load(base / "sft", device="cpu"), prompts, 1, Sampling(), rm.max_len, seed=99))
    print(f"fresh base samples: mean {fresh.mean().item():.3f}, std {fresh.std().item():.3f}; "
          f"offset {rm.model.offset:.3f}, scale {rm.model.scale:.3f}")
    assert abs(fresh.mean().item()) < 0.5 and 0.6 < fresh.std().item() < 1.6


def test_ppo_ema_and_ptx_change_what_is_trained(base, reward_dir, tmp_path):
    import engine
    from engine.rlhf.ppo import train_ppo
    common = dict(prompts=str(base / "prompts.jsonl"), max_steps=2, batch_size=4, minibatch_size=4, ppo_epochs=2,
                  lr=1e-3, max_new_tokens=8, eval_every=100, device="cpu")
    start = engine.load(base / "sft", device="cpu").model.state_dict()

    def moved(name, **options):
        with Store(tmp_path / f"{name}.db") as store:
            train_ppo(PPOConfig(policy=str(base / "sft"), reward_model=str(reward_dir), out=str(tmp_path / name),
                                **common, **options), store)
            metrics = {m["name"] for m in store.metrics(store.runs()[0]["id"])}
        trained = engine.load(tmp_path / name, device="cpu").model.state_dict()
        return sum((trained[k] - start[k]).norm().item() for k in start), trained, metrics

    plain, plain_weights, plain_metrics = moved("plain")
    averaged, _, _ = moved("ema", ema=0.7)
    _, ptx_weights, ptx_metrics = moved("ptx", ptx_coef=1.0, data=str(base / "chat.jsonl"), ptx_batch=3)
    # the EMA of the four iterates, not the last one, is saved: about 0.56 of the way for steps of one size
    assert 0.2 * plain < averaged < 0.85 * plain
    assert "ptx_loss" in ptx_metrics and "ptx_loss" not in plain_metrics
    assert any(not torch.allclose(ptx_weights[k], plain_weights[k]) for k in start)
    with Store(tmp_path / "ptx.db") as store:
        assert min(m["value"] for m in store.metrics(store.runs()[0]["id"], "ptx_loss")) > 0


def rlhf_args(mode, base, reward_dir):
    common = ["--max-steps", 6, "--save-every", 2, "--seed", 1, "--device", "cpu", "--lr", 1e-3]
    return {"rm": ["train", "rm", "--base", base / "sft", "--prefs", base / "prefs.jsonl", "--eval-every", 3],
            "dpo": ["train", "dpo", "--policy", base / "sft", "--prefs", base / "prefs.jsonl", "--eval-every", 3],
            "ppo": ["train", "ppo", "--policy", base / "sft", "--reward-model", reward_dir, "--prompts",
                    base / "prompts.jsonl", "--batch-size", 4, "--target-kl", 1.0, "--ema", 0.9, "--lr-schedule",
                    "linear", "--max-new-tokens", 12],
            **{method: ["train", method, "--policy", base / "sft", "--reward-model", reward_dir, "--prompts",
                        base / "prompts.jsonl", "--prompts-per-step", 2, "--replies", 3, "--target-kl", 1.0,
                        "--epochs", 2, "--max-new-tokens", 12, "--eval-every", 3] for method in ("rloo", "grpo")},
            }[mode] + common


def parley(*args, home, torchrun=False):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else []
    return subprocess.Popen([sys.executable, *launcher, "-m", "tui_app", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PARLEY_HOME": str(home)})


def weights(directory):
    from safetensors.torch import load_file
    return load_file(directory / "model.safetensors"), json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("mode", ["rm", "dpo", "ppo", "grpo"])
def test_rlhf_run_resumes_after_sigkill_to_the_same_weights(base, reward_dir, tmp_path, mode):
    args = rlhf_args(mode, base, reward_dir)
    whole = parley(*args, "--out", tmp_path / "whole", home=tmp_path / "home-whole")
    assert whole.wait() == 0, whole.stderr.read()

    cut = parley(*args, "--out", tmp_path / "cut", home=tmp_path / "home-cut")
    while not (tmp_path / "cut" / "checkpoints" / "step-000002").exists() and cut.poll() is None:
        time.sleep(0.005)
    cut.send_signal(signal.SIGKILL)
    assert cut.wait() == -signal.SIGKILL
    assert not (tmp_path / "cut" / "config.json").exists()
    resumed = parley(*args, "--out", tmp_path / "cut", "--resume", home=tmp_path / "home-cut")
    assert resumed.wait() == 0, resumed.stderr.read()

    (a, config_a), (b, config_b) = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # bit for bit
    assert config_a == config_b
    with Store(tmp_path / "home-cut" / "parley.db") as store:
        [run] = store.runs()
        assert run["status"] == "finished" and [m["step"] for m in store.metrics(run["id"], "loss" if mode in ("rm", "dpo")
                                                                                  else "reward")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("mode", ["rm", "dpo", "ppo", "rloo"])
def test_rlhf_run_under_torchrun_matches_one_process(base, reward_dir, tmp_path, mode):
    args = rlhf_args(mode, base, reward_dir) + ["--max-steps", 3]
    one = parley(*args, "--out", tmp_path / "one", home=tmp_path / "home-one")
    two = parley(*args, "--out", tmp_path / "two", home=tmp_path / "home-two", torchrun=True)
    assert one.wait() == 0, one.stderr.read()
    assert two.wait() == 0, two.stderr.read()
    (a, _), (b, _) = weights(tmp_path / "one"), weights(tmp_path / "two")
    # The two runs sum the same gradients in another order. Adam divides each gradient by its own
    # running size, so where a gradient is about as small as that rounding noise its sign is noise
    # and the weight can step a whole lr = 1e-3 the other way: a handful of weights in a run. A
    # process that missed the other's gradients would be off by about lr on most weights.
    assert a.keys() == b.keys()
    off = sum(int((a[k] - b[k]).abs().gt(2e-4).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    assert off <= total * 1e-4, f"{off} of {total} weights differ by more than 2e-4"
    curves = []
    for home in ("home-one", "home-two"):
        with Store(tmp_path / home / "parley.db") as store:
            [run] = store.runs()    # the second process records nothing
            curves.append([m["value"] for m in store.metrics(run["id"], "loss" if mode in ("rm", "dpo") else "reward")])
    assert curves[0] == pytest.approx(curves[1], rel=1e-4, abs=1e-6)
