"""LoRA adapters (engine/lora.py): PEFT's format and maths, one copy of the weights for policy and
reference, only the adapter trains and is saved, and every trainer runs with one."""
import json

import pytest
import torch

import engine
from engine import ParleyError, lora
from engine.lm import LM

IDS = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 21], [8, 8, 130, 64, 2, 11, 12, 13]])


def adapter_on(path, r=4, alpha=8.0, targets=None, seed=0):
    """The base at `path` with an adapter whose B is random too, so that it changes the logits."""
    adapted = lora.add(engine.load(path, device="cpu", dtype="float32"), str(path), r, alpha, targets)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora.adapted_layers(adapted.model).values():
            layer.lora_B.normal_(std=0.2)
    return adapted


def save(adapted: LM, directory):
    directory.mkdir()
    adapted.write(directory)
    return directory


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2", "gpt2"])
def test_peft_loads_the_adapter_to_the_same_logits(checkpoints, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    path, _ = checkpoints(name)
    adapted = adapter_on(path)
    with torch.no_grad():
        ours = adapted.model(IDS)
        base = engine.load(path, device="cpu", dtype="float32").model(IDS)
    assert (ours - base).abs().max() > 1e-2   # the adapter matters
    directory = save(adapted, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(path.resolve())
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, directory).eval()
    # every tensor was read by its PEFT name (none left at PEFT's initial B = 0)
    assert all(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        theirs = peft_model(IDS).logits
        merged = engine.load(directory, device="cpu", dtype="float32")   # the adapter directory as a model
        assert not lora.adapted_layers(merged.model)                      # merged: plain layers decode
        assert (merged.model(IDS) - theirs).abs().max() < 1e-4
    assert (ours - theirs).abs().max() < 1e-4




def test_the_reference_is_the_policy_with_its_adapter_off_one_copy_of_the_weights(checkpoints):
    from engine.train.run import frozen_copy
    path, _ = checkpoints("llama_gqa_untied")
    base = engine.load(path, device="cpu", dtype="float32")
    policy = adapter_on(path)
    reference = frozen_copy(policy.model)
    held = {p.data_ptr(): p.numel() * p.element_size()
            for p in [*policy.model.parameters(), *reference.parameters()]}
    adapter = [p for n, p in policy.model.named_parameters() if "lora_" in n]
    assert adapter and all(p.requires_grad for p in adapter)
    assert all(not p.requires_grad for n, p in policy.model.named_parameters() if "lora_" not in n)
    assert len(held) == len(list(base.model.parameters())) + len(adapter)
    assert sum(held.values()) == sum(p.numel() * 4 for p in [*base.model.parameters(), *adapter])
    with torch.no_grad():
        assert torch.equal(reference(IDS), base.model(IDS))
        assert (policy.model(IDS) - base.model(IDS)).abs().max() > 1e-2   # the adapter is back on after


def test_decoding_paths_see_the_adapter_as_it_is_now(checkpoints):
    """One row under no_grad takes the packed oneDNN path on the CPU (engine/models/linear.py),
    whose packed weights must follow the adapter: on, off (the reference), and after a step."""
    from engine.train.run import frozen_copy
    path, _ = checkpoints("llama_gqa_untied")
    base = engine.load(path, device="cpu", dtype="float32").model
    policy = adapter_on(path).model
    reference = frozen_copy(policy)
    row = IDS[:1, :3]

    def expected():   # the same maths as a plain model: the adapters folded into a copy
        import copy
        return lora.merge(copy.deepcopy(policy))(row)
    with torch.no_grad():
        for _ in range(2):
            assert (policy(row) - expected()).abs().max() < 1e-4
            assert (reference(row) - base(row)).abs().max() < 1e-5
        for layer in lora.adapted_layers(policy).values():
            layer.lora_B.add_(0.1)    # an optimizer step, in place
        assert (policy(row) - expected()).abs().max() < 1e-4
        assert (reference(row) - base(row)).abs().max() < 1e-5


# -- the trainers ----------------------------------------------------------------------------------------
from safetensors.torch import load_file  # noqa: E402

from engine.train.config import (  # noqa: E402
    DPOConfig, GRPOConfig, PPOConfig, RewardModelConfig, RLOOConfig, SFTConfig, validate)

TOPICS = ["the sea", "my garden", "a good book", "the weather", "coffee", "trains"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_data")
    chats = [{"messages": [{"role": "user", "content": f"what about {t}, number {i}?"},
                           {"role": "assistant", "content": f"I really like {t}."}]}
             for i in range(40) for t in TOPICS[i % 6:i % 6 + 1]]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    prefs = [{"prompt": [{"role": "user", "content": f"What should I drink, friend {i}?"}],
              "chosen": [{"role": "assistant", "content": "Some tea."}],
              "rejected": [{"role": "assistant", "content": "Some soda."}]} for i in range(40)]
    (root / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in prefs))
    return root


def adapter_tensors(directory):
    return load_file(directory / "adapter_model.safetensors")


def assert_adapter_dir(directory, base_path):
    assert (directory / "adapter_config.json").is_file() and not (directory / "model.safetensors").exists()
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_path.resolve())
    tensors = adapter_tensors(directory)
    assert tensors and all(k.startswith("base_model.model.") and ".lora_" in k for k in tensors)
    return tensors


def checkpoint_tensors(out):
    [*_, newest] = sorted((out / "checkpoints").glob("step-*"))
    return load_file(newest / "trainer_state.safetensors")


def test_sft_with_lora_trains_saves_and_resumes_only_the_adapter(checkpoints, files, tmp_path):
    from engine.train.trainer import train
    path, _ = checkpoints("llama_gqa_untied")
    base_before = {k: v.clone() for k, v in engine.load(path, device="cpu").model.state_dict().items()}
    c = dict(model=str(path), data=str(files / "chat.jsonl"), seq_len=32, batch_size=4, lr=1e-2, warmup_steps=1,
             max_steps=6, eval_every=3, eval_batches=1, save_every=3, device="cpu", lora_r=4, lora_targets="q_proj,v_proj")
    train(SFTConfig(out=str(tmp_path / "a"), **c))
    tensors = assert_adapter_dir(tmp_path / "a", path)
    assert {k.rsplit(".", 3)[-3] for k in tensors} == {"q_proj", "v_proj"}
    # the checkpoint is an adapter directory too, and the optimizer's state is the adapter's
    [*_, newest] = sorted((tmp_path / "a" / "checkpoints").glob("step-*"))
    assert (newest / "adapter_config.json").is_file() and not (newest / "model.safetensors").exists()
    moments = {k: v for k, v in checkpoint_tensors(tmp_path / "a").items() if k.endswith("exp_avg")}
    assert len(moments) == len(tensors) and sum(v.numel() for v in moments.values()) == \
        sum(v.numel() for v in tensors.values())
    # the base is untouched; the adapter changed the model; the result loads as base + adapter
    assert all(torch.equal(v, base_before[k]) for k, v in engine.load(path, device="cpu").model.state_dict().items())
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)
    with torch.no_grad():
        assert (engine.load(tmp_path / "a", device="cpu").model(IDS) -
                engine.load(path, device="cpu").model(IDS)).abs().max() > 1e-3
    # resumed from step 3, it ends with the adapter an uninterrupted run has
    train(SFTConfig(out=str(tmp_path / "b"), **{**c, "max_steps": 6}))
    import shutil
    shutil.rmtree(sorted((tmp_path / "b" / "checkpoints").glob("step-*"))[-1])
    train(SFTConfig(out=str(tmp_path / "b"), resume=True, **c))
    resumed = adapter_tensors(tmp_path / "b")
    assert all(torch.allclose(resumed[k], tensors[k], atol=1e-6) for k in tensors)


def test_lora_options_are_checked_before_any_work(checkpoints, tmp_path):
    from engine.train.trainer import train
    path, _ = checkpoints("llama_gqa_untied")
    with pytest.raises(ParleyError, match="add --lora-r"):
        validate(SFTConfig(out=str(tmp_path / "x"), model=str(path), lora_alpha=16.0))
    with pytest.raises(ParleyError, match="--lora-r 0 is out of range"):
        validate(SFTConfig(out=str(tmp_path / "x"), model=str(path), lora_r=0))
    with pytest.raises(ParleyError, match="names no layer of this model: use some of .*q_proj"):
        train(SFTConfig(out=str(tmp_path / "x"), model=str(path), lora_r=2, lora_targets="nope", device="cpu"))
    with pytest.raises(ParleyError, match="--lora-r adapts a trained model"):
        train(SFTConfig(out=str(tmp_path / "y"), preset="tiny", tokenizer=str(path), lora_r=2, device="cpu"))


def test_dpo_with_lora_trains_the_adapter_against_the_base(checkpoints, files, tmp_path):
    from engine.rlhf.dpo import train_dpo
    path, _ = checkpoints("llama_gqa_untied")
    train_dpo(DPOConfig(policy=str(path), prefs=str(files / "prefs.jsonl"), out=str(tmp_path / "dpo"), max_steps=3,
                        lr=1e-2, prompts_per_step=4, eval_every=3, save_every=3, device="cpu", lora_r=2))
    tensors = assert_adapter_dir(tmp_path / "dpo", path)
    saved = {k.removeprefix("module.policy."): v for k, v in checkpoint_tensors(tmp_path / "dpo").items()
             if k.startswith("module.")}
    assert len(saved) == len(tensors) and all(".lora_" in k for k in saved)


def test_rm_with_lora_saves_a_whole_reward_model(checkpoints, files, tmp_path):
    from engine.rlhf.reward_model import load_reward_model, train_reward_model
    path, _ = checkpoints("llama_gqa_untied")
    rm = train_reward_model(RewardModelConfig(base=str(path), prefs=str(files / "prefs.jsonl"), out=str(tmp_path / "rm"),
                                              max_steps=2, lr=1e-2, prompts_per_step=4, eval_every=2, save_every=2,
                                              normalise_samples=4, max_new_tokens=4, device="cpu", lora_r=2))
    saved = [k for k in checkpoint_tensors(tmp_path / "rm") if k.startswith("module.")]
    assert saved and all(".lora_" in k or k.endswith("score.weight") for k in saved)
    loaded = load_reward_model(tmp_path / "rm", device="cpu")
    pairs = [([{"role": "user", "content": "hi"}], "Some tea.")]
    assert abs(loaded.rewards(pairs)[0] - rm.rewards(pairs)[0]) < 1e-4   # the adapter is merged in


@pytest.fixture(scope="module")
def reward_dir(checkpoints, tmp_path_factory):
    from engine.rlhf.reward_model import RewardLM, RewardModel
    path, _ = checkpoints("llama_gqa_untied")
    lm = engine.load(path, device="cpu", dtype="float32")
    torch.manual_seed(1)
    model = RewardModel(lm.model)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    out = tmp_path_factory.mktemp("lora_rm") / "rm"
    RewardLM(model.eval(), lm.tokenizer, {**lm.config, "parley_max_length": 64}).save(out)
    return out


@pytest.mark.parametrize("mode", ["ppo", "rloo", "grpo"])
def test_online_methods_with_lora_train_and_save_the_adapter(checkpoints, files, reward_dir, tmp_path, mode):
    path, _ = checkpoints("llama_gqa_untied")
    common = dict(policy=str(path), reward_model=str(reward_dir), prompts=str(files / "prompts.jsonl"),
                  out=str(tmp_path / mode), max_steps=2, lr=1e-2, max_new_tokens=4, eval_every=2, save_every=2,
                  eval_prompts=2, device="cpu", lora_r=2)
    if mode == "ppo":
        from engine.rlhf.ppo import train_ppo
        train_ppo(PPOConfig(batch_size=4, minibatch_size=2, ppo_epochs=1, **common))
    else:
        from engine.rlhf.group import train_group
        train_group({"rloo": RLOOConfig, "grpo": GRPOConfig}[mode](prompts_per_step=2, replies=2, **common))
    tensors = assert_adapter_dir(tmp_path / mode, path)
    actor = [k for k in checkpoint_tensors(tmp_path / mode) if k.startswith("module.actor.")]
    assert len(actor) == len(tensors) and all(".lora_" in k for k in actor)


def test_merge_writes_the_merged_model(checkpoints, tmp_path, capsys):
    from engine.cli import main
    path, _ = checkpoints("qwen2")
    adapted = adapter_on(path)
    directory = save(adapted, tmp_path / "adapter")
    assert main(["merge", str(directory), "--out", str(tmp_path / "merged")]) == 0
    merged = engine.load(tmp_path / "merged", device="cpu", dtype="float32")
    assert (tmp_path / "merged" / "model.safetensors").is_file() and not lora.adapted_layers(merged.model)
    with torch.no_grad():
        assert (merged.model(IDS) - adapted.model(IDS)).abs().max() < 1e-4
    # bad input: one line each, nothing written
    assert main(["merge", str(path), "--out", str(tmp_path / "m2")]) == 1
    assert "has no adapter_config.json" in capsys.readouterr().err and not (tmp_path / "m2").exists()
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "no-such"}))
    assert main(["merge", str(directory), "--out", str(tmp_path / "m3")]) == 1
    err = capsys.readouterr().err
    assert "its base model is not here" in err and len(err.strip().splitlines()) == 1
