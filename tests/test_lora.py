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
