"""int8 weights and decode-only models (engine/quantize.py, engine/models/linear.py)."""
from pathlib import Path

import pytest
import torch

import engine
from engine.errors import ParleyError
from engine.generate import generate
from engine.quantize import quantize_int8
from engine.settings import Settings

DEFAULT = "assets/default-model"


def test_per_channel_scales_match_a_hand_computation():
    w = torch.tensor([[0.5, -1.27, 0.0, 0.1], [2.54, 1.0, -0.5, 0.0]])
    q, scales = quantize_int8(w)
    # row max |w| / 127, rounded to bfloat16: 0.01 and 0.02
    assert torch.equal(scales, torch.tensor([1.27 / 127, 2.54 / 127]).to(torch.bfloat16))
    s = scales.float()
    assert torch.equal(q, torch.round(w / s[:, None]).to(torch.int8))
    assert q.abs().max() <= 127 and q[0, 1] == -127


def _greedy(lm, ids, n=20):
    return generate(lm, ids, [Settings(temperature=0, max_new_tokens=n)], top_alternatives=0)[0].token_ids


def test_decode_only_model_decodes_identically_and_refuses_training_and_saving(tmp_path):
    plain = engine.load(DEFAULT, device="cpu")
    packed = engine.load(DEFAULT, device="cpu", decode_only=True)
    assert any(p.is_meta for p in packed.model.parameters())   # the plain weights are gone
    ids = plain.tokenizer.encode_chat([{"role": "user", "content": "hi! how are you today?"}])
    assert _greedy(packed, ids) == _greedy(plain, ids)
    x = torch.tensor([ids])
    # a 19-token prefill: the plain model runs it through MKL, the packed one through oneDNN (same
    # maths, other rounding order), so float32 rounding apart (measured 1.3e-5)
    assert (packed.logits(x) - plain.logits(x)).abs().max() < 1e-4
    with pytest.raises(ParleyError, match="only to decode"):
        packed.save(tmp_path / "out")
    with pytest.raises(ParleyError, match="only to decode"):
        packed.model(x)   # gradients enabled: training
    from engine import lora
    with pytest.raises(ParleyError, match="only to decode"):
        lora.add(packed, DEFAULT, 4)


def test_int8_logits_close_to_float32_and_greedy_ids_equal():
    plain = engine.load(DEFAULT, device="cpu")
    q = engine.load(DEFAULT, device="cpu", quantize="int8")
    assert q.model.lm_head.packed.form == "int8"
    ids = plain.tokenizer.encode_chat([{"role": "user", "content": "hi! how are you today?"}])
    x = torch.tensor([ids])
    a, b = plain.logits(x), q.logits(x)
    # int8 per-channel rounding (<= half a step, 1/254 of a row's largest weight) plus bfloat16
    # activations in the products: measured 0.09 on logits of magnitude ~18
    assert (a - b).abs().max() < 0.5
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert _greedy(q, ids) == _greedy(plain, ids)   # the shipped model's greedy reply survives


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi", "--max-new-tokens", "2"], ["serve", "--port", "0"]])
def test_quantize_flag_reaches_the_engine(monkeypatch, command):
    from engine import cli
    from engine.serve import app as serve_app
    seen = {}
    real = engine.load

    def spy(path, *args, **kwargs):
        seen.update(kwargs)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(engine, "load", spy)
    monkeypatch.setattr(serve_app.Server, "run", lambda self: self.close())   # loaded, not served
    assert cli.main(command + ["--quantize", "int8", "--device", "cpu"]) in (0, None)
    assert seen["quantize"] == "int8" and seen["decode_only"]


def test_app_takes_quantize(monkeypatch):
    from tui_app import main as app_main
    got = {}
    monkeypatch.setattr(app_main, "run_app", lambda args: got.update(q=args.quantize))
    with pytest.raises(SystemExit):
        app_main.main(["--quantize", "int8"])
    assert got["q"] == "int8"


def test_rollouts_drawn_from_an_int8_copy_of_the_policy_as_it_is_now(monkeypatch):
    """--rollout-quantize: each rollout draws from an int8 copy made from the policy's current
    weights, its LoRA adapter folded in, and leaves the policy (still training) untouched."""
    from engine import lora
    from engine.quantize import prepare
    from engine.rlhf import rollout
    policy = lora.add(engine.load(DEFAULT, device="cpu", dtype="float32"), DEFAULT, 4)
    torch.manual_seed(0)
    layers = lora.adapted_layers(policy.model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.05)   # an adapter that changes the replies
    # The reference: the same weights folded in by hand (W + scale B A), quantized as a model loaded so.
    by_hand = engine.load(DEFAULT, device="cpu", dtype="float32")
    with torch.no_grad():
        for name, module in by_hand.model.named_modules():
            if name in layers:
                a = layers[name]
                module.weight.add_(a.lora_scale * a.lora_B @ a.lora_A)
    prepare(by_hand, "int8")

    seen = []
    real = rollout.generate_batch
    monkeypatch.setattr(rollout, "generate_batch", lambda lm, *a, **k: seen.append(lm) or real(lm, *a, **k))
    prompts = [[{"role": "user", "content": "hi! how are you?"}], [{"role": "user", "content": "tell me a story"}]]
    drawn = rollout.sample(policy, prompts, 2, rollout.Sampling(1.5, 12, "int8"), 128, seed=7)
    assert seen[0] is not policy and seen[0].quantize == "int8"
    expected = rollout.sample(by_hand, prompts, 2, rollout.Sampling(1.5, 12), 128, seed=7)
    assert [s[3] for s in drawn] == [s[3] for s in expected]
    # the policy keeps its plain weights, its trainable adapter and its float decoding path
    assert not any(p.is_meta for p in policy.model.parameters())
    assert all(layer.lora_A.requires_grad for layer in layers.values())
    assert policy.model.lm_head.packed.form is None


def test_rollout_quantize_is_refused_off_the_cpu():
    from engine.rlhf.rollout import start_online
    from engine.train.config import GRPOConfig

    class Run:
        device = torch.device("cuda")
    c = GRPOConfig(policy=DEFAULT, reward_model="nowhere", rollout_quantize="int8")
    with pytest.raises(ParleyError, match="--rollout-quantize int8 runs on the CPU only"):
        start_online(c, Run(), None)


def _resident_in(t: torch.Tensor) -> int:
    """Bytes of the memory map holding `t` that this process has in RAM (Rss in /proc/self/smaps)."""
    addr, inside = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and ":" not in line.split()[0]:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            inside = low <= addr < high
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no map holds the tensor")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_decode_only_head_stays_a_map_of_the_checkpoint_and_only_read_rows_come_in(tmp_path):
    """The tied embedding (the output head) of a decode-only model is a fresh map of the checkpoint's
    bytes: the same values, none in memory until read; a decoding step brings in the rows it looks up,
    the head's products read the packed copy. Loaded in another dtype than the file's, it is a copy."""
    from engine import quantize
    plain = engine.load(DEFAULT, device="cpu")
    lm = engine.load(DEFAULT, device="cpu", decode_only=True)
    head = lm.model.lm_head.weight
    mapped = quantize._file_mapping(head)
    assert mapped is not None and Path(mapped[0]).resolve() == (Path(DEFAULT) / "model.safetensors").resolve()
    total, before = head.nbytes, _resident_in(head)
    ids = plain.tokenizer.encode_chat([{"role": "user", "content": "hi! how are you today?"}])
    assert _greedy(lm, ids, 8) == _greedy(plain, ids, 8)
    after = _resident_in(head)
    # the pages were given back after the check; decoding read only a few dozen rows' pages
    assert before < total // 20 and after < total // 4, (before, after, total)
    assert torch.equal(head, plain.model.lm_head.weight)
    cast = engine.load(DEFAULT, device="cpu", dtype="bfloat16", decode_only=True)
    assert quantize._file_mapping(cast.model.lm_head.weight) is None
