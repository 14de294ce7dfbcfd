"""The decoders against transformers: same logits, same cached decoding, and round trips."""
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import engine
from engine.errors import ParleyError
from helpers import CONFIGS

NAMES = list(CONFIGS)


def left_padded_batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(checkpoints, name):
    path, ref = checkpoints(name)
    lm = engine.load(path, device="cpu", dtype="float32")
    ids = torch.randint(0, lm.tokenizer.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (lm.logits(ids) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_logits_equal_transformers(checkpoints, name):
    path, ref = checkpoints(name)
    lm = engine.load(path, device="cpu")
    ids, mask = left_padded_batch([9, 4, 7], lm.tokenizer.vocab_size)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # as transformers' generate() derives them
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
    ours = lm.logits(ids, attention_mask=mask)
    real = mask.bool()
    assert (ours[real] - expected[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_equals_full_forward(checkpoints, name):
    path, _ = checkpoints(name)
    lm = engine.load(path, device="cpu")
    lengths = [10, 6, 3]
    ids, mask = left_padded_batch(lengths, lm.tokenizer.vocab_size, seed=2)
    width, steps = ids.shape[1], 4
    new = torch.randint(1, lm.tokenizer.vocab_size, (len(lengths), steps), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = lm.model.new_cache(len(lengths), width + steps)
        step_logits = [lm.model(ids, cache=cache, pad_mask=mask, last_only=True)]
        for t in range(steps):
            step_logits.append(lm.model(new[:, t:t + 1], cache=cache))
    cached = torch.cat(step_logits, dim=1)  # logits after the prompt and after each new token
    for row, n in enumerate(lengths):
        alone = torch.cat([ids[row, width - n:], new[row]])[None]
        full = lm.logits(alone)[0, n - 1:]
        assert (cached[row] - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_a_lone_row_decodes_widened_with_the_same_bits(checkpoints, name, monkeypatch):
    """One candidate decodes with its row widened to four once (linear.widen), not padded at every
    product: the logits equal the full forward's, and bit for bit those of the unwidened path."""
    path, _ = checkpoints(name)
    lm = engine.load(path, device="cpu")
    ids = torch.randint(1, lm.tokenizer.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))

    def decode():
        with torch.inference_mode():
            cache = lm.model.new_cache(1, 9)
            logits = [lm.model(ids[:, :5], cache=cache, last_only=True)]
            logits += [lm.model(ids[:, t:t + 1], cache=cache) for t in range(5, 9)]
        return torch.cat(logits, dim=1)
    widened = decode()
    assert (widened - lm.logits(ids)[:, 4:]).abs().max().item() < 1e-4
    model_module = sys.modules[type(lm.model).__module__]
    monkeypatch.setattr(model_module, "widen", lambda x, head: x)
    assert torch.equal(decode(), widened)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_untied", "qwen2"])
def test_cache_rows_can_be_shared_and_reordered(checkpoints, name):
    path, _ = checkpoints(name)
    lm = engine.load(path, device="cpu")
    prompt = torch.randint(1, lm.tokenizer.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    nxt = torch.tensor([[5], [9], [17]])
    with torch.no_grad():
        cache = lm.model.new_cache(1, 8)
        lm.model(prompt, cache=cache)
        cache.select_rows(torch.tensor([0, 0, 0]))  # one prefill serves three candidates
        shared = lm.model(nxt, cache=cache)[:, -1]
    for row in range(3):
        alone = lm.logits(torch.cat([prompt[0], nxt[row]])[None])[0, -1]
        assert (shared[row] - alone).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_untied", "llama3_tied_scaled", "qwen2", "mistral"])
def test_save_then_transformers_load_gives_same_logits(checkpoints, tmp_path, name):
    path, _ = checkpoints(name)
    lm = engine.load(path, device="cpu")
    lm.save(tmp_path / "saved")
    ids = torch.randint(0, lm.tokenizer.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert (ref(ids).logits - lm.logits(ids)).abs().max().item() < 1e-4
    again = engine.load(tmp_path / "saved", device="cpu")
    assert torch.equal(again.logits(ids), lm.logits(ids))
    assert again.tokenizer.encode("Hello there!") == lm.tokenizer.encode("Hello there!")
    assert again.tokenizer.chat_template == lm.tokenizer.chat_template


def test_save_replaces_only_its_own_files(checkpoints, tmp_path):
    """A second save into a directory Parley wrote replaces the files it wrote there (and removes
    those it wrote before and not now); a file the person put there stays; a directory of foreign
    files is refused, untouched."""
    lm = engine.load(checkpoints("gpt2")[0], device="cpu")
    out = tmp_path / "model"
    lm.generation_config = {"do_sample": False}
    lm.save(out)
    assert (out / "generation_config.json").exists()
    (out / "notes.txt").write_text("mine")
    lm.generation_config = {}   # this save writes no generation_config.json: the earlier one goes
    lm.save(out)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "generation_config.json").exists()
    assert engine.load(out, device="cpu").num_parameters() == lm.num_parameters()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]   # no temporary directories left
    foreign = tmp_path / "corpus"
    foreign.mkdir()
    (foreign / "train.txt").write_text("hello")
    with pytest.raises(ParleyError, match="already holds files Parley did not write"):
        lm.save(foreign)
    assert [p.name for p in foreign.iterdir()] == ["train.txt"]


def test_bfloat16_is_close_to_float32(checkpoints):
    path, _ = checkpoints("llama_gqa_untied")
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(6))
    full = engine.load(path, device="cpu", dtype="float32").logits(ids)
    half = engine.load(path, device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert (half.logits(ids) - full).abs().max().item() < 0.25


def test_sharded_checkpoint_loads(checkpoints, tmp_path):
    path, ref = checkpoints("llama_gqa_untied")
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    for f in path.glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (engine.load(tmp_path, device="cpu").logits(ids) - ref(ids).logits).abs().max().item() < 1e-4
