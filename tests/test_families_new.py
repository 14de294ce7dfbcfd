"""Qwen3, SmolLM3, Phi-3, Gemma 2 and Gemma 3 against transformers, on tiny random checkpoints:
the same logits (also left-padded, and through the KV cache past a sliding window), the same
greedy and beam-search ids as transformers' generate(), and a save that transformers reads back."""
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

import engine
from engine import ParleyError
from engine.generate import generate
from engine.models import FAMILIES, gemma, llama
from engine.rlhf.reward_model import CLASSIFIERS, RewardLM, RewardModel
from engine.settings import Settings
from helpers import hf_tokenizer

SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    # head_dim 24 is not hidden / heads: the q/k norms and the projections must read it from the config
    "qwen3": dict(model_type="qwen3", **SMALL, num_hidden_layers=2, head_dim=24, tie_word_embeddings=True),
    "qwen3_bias_untied": dict(model_type="qwen3", **SMALL, num_hidden_layers=2, head_dim=16, attention_bias=True,
                              tie_word_embeddings=False),
    # layers 1 and 3 (every second) have no rotary positions
    "smollm3": dict(model_type="smollm3", **SMALL, num_hidden_layers=4, no_rope_layer_interval=2),
    "phi3": dict(model_type="phi3", **SMALL, num_hidden_layers=2, sliding_window=4),
    # Phi-4-mini's shape: rotary positions over 3/4 of each head (12 of 16), and Phi-3.5's LongRoPE
    # from 20 pretrained positions to 80, so that the tests' sequences (up to ~32) cross the switch
    "phi3_longrope": dict(model_type="phi3", **SMALL, num_hidden_layers=2, partial_rotary_factor=0.75,
                          max_position_embeddings=80, original_max_position_embeddings=20,
                          rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.3, 1.1, 2.0, 3.5, 1.2],
                                            long_factor=[1.5, 2.5, 4.0, 6.0, 9.0, 12.0])),
    # tiny caps so that both soft-cappings change the numbers; a 4-token window, layers alternating
    "gemma2": dict(model_type="gemma2", **SMALL, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
                   sliding_window=4, attn_logit_softcapping=1.5, final_logit_softcapping=4.0),
    # two sliding layers to one global, a local rotary base of its own, linear scaling on global layers
    "gemma3_text": dict(model_type="gemma3_text", **SMALL, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
                        sliding_window=4, sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=100.0,
                        rope_scaling=dict(rope_type="linear", factor=2.0), final_logit_softcapping=4.0),
}
NAMES = list(CONFIGS)
GREEDY = dict(temperature=0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, transformers model), each built once, with transformers' eager attention
    (SDPA cannot soft-cap Gemma 2's scores)."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            tok = hf_tokenizer()
            kwargs = dict(CONFIGS[name])
            config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=tok.vocab_size, initializer_range=0.2,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id, **kwargs)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
            with torch.no_grad():   # random, not zero, norms and biases, so that every tensor matters
                for pname, p in model.named_parameters():
                    if "norm" in pname or pname.endswith("bias"):
                        p.add_(torch.randn_like(p) * 0.3)
            model.save_pretrained(path)
            tok.save_pretrained(path)
            cache[name] = (path, model)
        return cache[name]
    return get


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
    # left padding: the sliding window counts real tokens, not slots
    ids, mask = left_padded_batch([11, 4, 8], lm.tokenizer.vocab_size)
    positions = (mask.cumsum(1) - 1).clamp(min=0)   # as transformers' generate() derives them
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (lm.logits(ids, attention_mask=mask)[real] - expected[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_past_the_window_equals_full_forward(checkpoints, name):
    """Prompts and replies longer than the 4-token sliding window: the cache keeps every position
    and each sliding layer masks what lies outside its window, step after step."""
    path, _ = checkpoints(name)
    lm = engine.load(path, device="cpu")
    lengths, steps = [10, 6, 3], 7
    ids, mask = left_padded_batch(lengths, lm.tokenizer.vocab_size, seed=2)
    width = ids.shape[1]
    new = torch.randint(1, lm.tokenizer.vocab_size, (len(lengths), steps), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for slots in ("prefill", "decode"):   # KVCache.step, then KVCache.decode_slot (what generate runs)
            cache = lm.model.new_cache(len(lengths), width + steps)
            logits = [lm.model(ids, cache=cache, pad_mask=mask, last_only=True)]
            for t in range(steps):
                logits.append(lm.model(new[:, t:t + 1], cache=cache if slots == "prefill" else cache.decode_slot()))
            cached = torch.cat(logits, dim=1)
            for row, n in enumerate(lengths):
                full = lm.logits(torch.cat([ids[row, width - n:], new[row]])[None])[0, n - 1:]
                assert (cached[row] - full).abs().max().item() < 1e-4, (slots, row)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_and_beam_search_equal_transformers_generate(checkpoints, name):
    path, ref = checkpoints(name)
    lm = engine.load(path, device="cpu")
    prompt = lm.tokenizer.encode("Hello there! How are you doing today?")
    eos = lm.eos_token_ids[0]

    def reference(**kwargs):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), eos_token_id=eos, pad_token_id=lm.tokenizer.pad_token_id,
                               do_sample=False, **kwargs)
        return [row[:row.index(eos) + 1] if eos in row else row for row in out[:, len(prompt):].tolist()]

    greedy = generate(lm, prompt, Settings(**GREEDY, max_new_tokens=20))[0].token_ids
    assert greedy == reference(max_new_tokens=20)[0]
    beam = dict(num_beams=3, num_return_sequences=2, length_penalty=0.0)
    result = generate(lm, prompt, Settings(**GREEDY, max_new_tokens=10, **beam))[0]
    assert [b["token_ids"] for b in result.beams] == reference(max_new_tokens=10, **beam)


@pytest.mark.parametrize("name", NAMES)
def test_save_then_transformers_load_gives_same_logits(checkpoints, tmp_path, name):
    path, _ = checkpoints(name)
    lm = engine.load(path, device="cpu")
    lm.save(tmp_path / "saved")
    ids = torch.randint(0, lm.tokenizer.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (ref(ids).logits - lm.logits(ids)).abs().max().item() < 1e-4
    again = engine.load(tmp_path / "saved", device="cpu")
    assert torch.equal(again.logits(ids), lm.logits(ids))


@pytest.mark.parametrize("name", NAMES)
def test_config_to_hf_builds_the_same_model_in_transformers(checkpoints, name):
    """Config.to_hf (what a fresh Parley model of the family writes) means the same model to transformers."""
    path, _ = checkpoints(name)
    lm = engine.load(path, device="cpu")
    hf = lm.model.config.to_hf()
    assert type(lm.model.config).from_hf(hf) == lm.model.config
    model_type = hf.pop("model_type")
    config = AutoConfig.for_model(model_type, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                                  **{k: v for k, v in hf.items() if k != "architectures"})
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    fam = FAMILIES[model_type]
    ref.load_state_dict(fam.state_to_hf(lm.model.state_dict()), strict=False)
    ref.tie_weights()
    ids = torch.randint(0, lm.tokenizer.vocab_size, (1, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ref(ids).logits - lm.logits(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["qwen3", "phi3", "gemma2", "gemma3_text"])
def test_transformers_reads_a_reward_model_of_the_family(checkpoints, tmp_path, name):
    path, _ = checkpoints(name)
    lm = engine.load(path, device="cpu")
    model = RewardModel(lm.model)
    torch.nn.init.normal_(model.score.weight, generator=torch.Generator().manual_seed(7))
    RewardLM(model.eval(), lm.tokenizer, dict(lm.config)).save(tmp_path / "rm")
    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", attn_implementation="eager").eval()
    ids = torch.randint(6, lm.tokenizer.vocab_size, (1, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert ref(ids).logits[0, 0].item() == pytest.approx(model(ids, torch.ones_like(ids)).item(), abs=1e-4)


def test_every_hf_family_has_a_reward_model_class():
    assert set(CLASSIFIERS) == {t for t in FAMILIES if not t.startswith("parley_")}


def test_older_config_spellings_read_the_same():
    """Checkpoints written before transformers 5 spell rotary settings flat (rope_theta,
    rope_local_base_freq, rope_scaling) and leave layer_types to a pattern; they mean the same."""
    new = dict(model_type="gemma3_text", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
               layer_types=["sliding_attention"] * 5 + ["full_attention", "sliding_attention"])
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert gemma.GemmaConfig.from_hf(old) == gemma.GemmaConfig.from_hf(new)
    assert AutoConfig.for_model(**old).layer_types == list(gemma.GemmaConfig.from_hf(old).layer_types)
    gemma2 = dict(old, model_type="gemma2", rope_theta=1e4)
    assert gemma.GemmaConfig.from_hf(gemma2).layer_types == tuple(AutoConfig.for_model(**gemma2).layer_types)
    smollm3 = dict(model_type="smollm3", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                   num_attention_heads=4)
    assert llama.LlamaConfig.from_hf(smollm3).nope_layers == (3, 7)   # every fourth layer by default


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_gemma_decode_step_compiles_whole_and_gives_the_eager_bits(checkpoints, monkeypatch, name):
    """As tests/test_generate.py checks for Llama: a decoding step through a fixed-width DecodeSlot,
    with the sliding layers' masks (DecodeSlot.mask) and Gemma 2's soft-capped attention, is one
    graph for torch.compile, compiles once, and computes the eager step's bits."""
    from engine.generate import decode_step, prefill
    from engine.models import linear
    lm = engine.load(checkpoints(name)[0], device="cpu")
    prompts = [lm.tokenizer.encode("Hello there! How are you?"), lm.tokenizer.encode("Hi")]
    n, room = max(map(len, prompts)), 6
    ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
    pad_mask = torch.tensor([[False] * (n - len(p)) + [True] * len(p) for p in prompts])

    def run(step):
        cache, logits = prefill(lm.model, ids, pad_mask, n + room)
        out = []
        with torch.inference_mode():
            for _ in range(room - 1):
                logits = step(lm.model, logits.argmax(-1)[:, None], cache.decode_slot(n + room))
                out.append(logits)
        return out

    monkeypatch.setattr(linear, "_onednn_dtypes", set())   # both take F.linear, so that both round alike
    eager = run(decode_step)
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    compiled = run(torch.compile(decode_step, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_is_close_to_float32(checkpoints, name):
    path, _ = checkpoints(name)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(9))
    full = engine.load(path, device="cpu", dtype="float32").logits(ids)
    half = engine.load(path, device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    # bfloat16 keeps ~3 digits: within 5% of the largest logit, or as close as transformers' own
    # bfloat16 comes (LongRoPE's sharper attention loses more: 5.4% there)
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        theirs = (ref(ids).logits.float() - full).abs().max().item()
    assert (half.logits(ids) - full).abs().max().item() < max(0.05 * full.abs().max().item(), 1.2 * theirs)
    assert len(generate(half, ids[0].tolist(), Settings(**GREEDY, max_new_tokens=6))[0].token_ids) == 6


def test_a_phi3_checkpoint_whose_stacked_tensors_do_not_split_gets_one_clear_line(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = checkpoints("phi3")
    shutil.copytree(path, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-1]   # one row short: q, k and v no longer add up
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ParleyError, match=rf"tensor '{name}' is not part of the model") as e:
        engine.load(tmp_path / "m", device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_training_gradients_equal_transformers(checkpoints, name):
    """The training path (autograd on, every position at once) gives transformers' loss and gradients."""
    path, ref = checkpoints(name)
    lm = engine.load(path, device="cpu", dtype="float32")
    ids = torch.randint(0, lm.tokenizer.vocab_size, (2, 10), generator=torch.Generator().manual_seed(10))

    def loss_and_grads(model, logits_of):
        model.zero_grad()
        logits = logits_of(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, ours_grads = loss_and_grads(lm.model, lm.model)
    theirs, their_grads = loss_and_grads(ref, lambda x: ref(x).logits)
    ref.zero_grad()
    assert ours == pytest.approx(theirs, abs=1e-5)
    fam = FAMILIES[lm.config["model_type"]]
    their_grads = {n: g for n, g in their_grads.items() if n != "lm_head.weight" or not lm.model.tied_keys}
    mine = fam.state_to_hf(ours_grads)
    assert set(mine) == set(their_grads)
    for n, g in mine.items():
        assert (g - their_grads[n]).abs().max().item() < 1e-4, n


BAD_CONFIGS = {
    "gemma2": [(dict(hidden_activation="relu"), r"hidden_activation 'relu' is not supported for gemma2"),
               (dict(use_bidirectional_attention=True), r"use_bidirectional_attention=true is not supported"),
               (dict(layer_types=["sliding_attention"]), r"layer_types must list .* for each of the 3 layers"),
               (dict(layer_types=["sliding_attention", "chunked", "full_attention"]), r"layer_types must list"),
               (dict(sliding_window=0), r"sliding_window is 0, but it must be 1 or more")],
    "gemma3_text": [(dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
                     r"rope scaling of gemma3_text's sliding layers is not supported"),
                    (dict(layer_types=None, sliding_window_pattern=0), r"sliding_window_pattern must be a positive")],
    "qwen3": [(dict(use_sliding_window=True), r"qwen3 with use_sliding_window=true is not supported: set it to false"),
              (dict(partial_rotary_factor=0.5), r"qwen3 with partial_rotary_factor other than 1 is not supported")],
    "phi3": [(dict(partial_rotary_factor=1.5), r"partial_rotary_factor is 1.5, but it must be a number in \(0, 1\]"),
             (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8}),
              r"longrope's short_factor has 7 numbers, but the rotary dimension needs 8")],
}


@pytest.mark.parametrize("name, change, message", [(n, c, m) for n, cases in BAD_CONFIGS.items() for c, m in cases])
def test_unsupported_settings_of_the_new_families_get_one_clear_line(checkpoints, tmp_path, name, change, message):
    path, _ = checkpoints(name)
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ParleyError, match=message) as e:
        engine.load(tmp_path / "m", device="cpu")
    assert "\n" not in str(e.value)


def test_a_gemma_with_only_global_layers_needs_no_window(checkpoints, tmp_path):
    """(transformers wants a window anyway; no layer of this model reads it, so Parley does not.)"""
    path, ref = checkpoints("gemma2")
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(layer_types=["full_attention"] * 3)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    lm = engine.load(tmp_path / "m", device="cpu")
    ids = torch.randint(0, lm.tokenizer.vocab_size, (1, 12), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert (ref(ids).logits - lm.logits(ids)).abs().max().item() < 1e-4
