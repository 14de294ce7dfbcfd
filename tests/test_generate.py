"""Batched, streamed generation against transformers' generate(), and its controls."""
import contextlib
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
from engine import ParleyError
from engine.generate import Finished, Generation, Token, generate
from engine.settings import Settings

GREEDY = dict(temperature=0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def llama(checkpoints):
    path, ref = checkpoints("llama_gqa_untied")
    lm = engine.load(path, device="cpu")
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "Hello there! How are you?"}])
    return lm, ref, prompt


def reference(ref, prompt, eos, **kwargs):
    """transformers' generate() output ids after the prompt, padding stripped."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), eos_token_id=eos,
                           do_sample=False, **kwargs)
    rows = []
    for row in out[:, len(prompt):].tolist():
        if eos in row:
            row = row[:row.index(eos) + 1]
        rows.append(row)
    return rows


def frequent_token(lm, prompt, step=3):
    """A token that greedy decoding emits at `step`: made EOS, it makes replies end early."""
    return generate(lm, prompt, Settings(**GREEDY, max_new_tokens=step + 1))[0].token_ids[step]


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_untied", "llama3_tied_scaled", "qwen2", "mistral"])
def test_greedy_equals_transformers(checkpoints, name):
    path, ref = checkpoints(name)
    lm = engine.load(path, device="cpu")
    prompt = lm.tokenizer.encode("Hello there! How are you doing today?")
    eos = lm.eos_token_ids[0]
    got = generate(lm, prompt, Settings(**GREEDY, max_new_tokens=24))[0].token_ids
    assert got == reference(ref, prompt, eos, max_new_tokens=24)[0]


@pytest.mark.parametrize("extra", [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
                                   dict(min_new_tokens=8)])
def test_greedy_with_processors_equals_transformers(llama, extra):
    lm, ref, prompt = llama
    eos = frequent_token(lm, prompt)
    lm.generation_config["eos_token_id"] = [eos]
    try:
        got = generate(lm, prompt, Settings(**GREEDY, max_new_tokens=20, **extra))[0].token_ids
    finally:
        del lm.generation_config["eos_token_id"]
    assert got == reference(ref, prompt, eos, max_new_tokens=20, **extra)[0]


@pytest.mark.parametrize("beam", [
    dict(num_beams=3),
    dict(num_beams=4, num_return_sequences=4),
    dict(num_beams=3, length_penalty=0.0, num_return_sequences=2),
    dict(num_beams=3, length_penalty=2.0, early_stopping=True),
    dict(num_beams=3, early_stopping="never", num_return_sequences=3),
    dict(num_beams=2, repetition_penalty=1.3, no_repeat_ngram_size=3),
])
@pytest.mark.parametrize("with_eos", [False, True])
def test_beam_search_equals_transformers(llama, beam, with_eos):
    lm, ref, prompt = llama
    eos = frequent_token(lm, prompt, step=2) if with_eos else lm.eos_token_ids[0]
    lm.generation_config["eos_token_id"] = [eos]
    try:
        result = generate(lm, prompt, Settings(**GREEDY, max_new_tokens=12, **beam))[0]
    finally:
        del lm.generation_config["eos_token_id"]
    expected = reference(ref, prompt, eos, max_new_tokens=12, **beam)
    assert [b["token_ids"] for b in result.beams] == expected
    assert result.token_ids == expected[0]


def test_seeded_sampling_is_reproducible_alone_and_in_any_batch(llama):
    lm, _, prompt = llama
    s = Settings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234, max_new_tokens=16)
    alone = generate(lm, prompt, s)[0].token_ids
    assert generate(lm, prompt, s)[0].token_ids == alone
    others = [Settings(temperature=0.7, seed=9, max_new_tokens=5), Settings(**GREEDY, max_new_tokens=30),
              Settings(**GREEDY, num_beams=2, max_new_tokens=8)]
    batch = generate(lm, prompt, others[:2] + [s] + others[2:])
    assert batch[2].token_ids == alone
    assert generate(lm, prompt, Settings(temperature=1.0, seed=99, max_new_tokens=16))[0].token_ids != alone


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_row_of_a_mixed_batch_gets_what_it_gets_alone(llama, dtype):
    _, _, prompt = llama
    lm = engine.load(llama[0].path, device="cpu", dtype=dtype)
    mixed = [Settings(**GREEDY, max_new_tokens=10),
             Settings(temperature=0.9, top_k=20, seed=1, max_new_tokens=14),
             Settings(temperature=1.3, top_p=0.8, min_p=0.0, repetition_penalty=1.2, seed=2, max_new_tokens=6),
             Settings(**GREEDY, num_beams=3, num_return_sequences=2, max_new_tokens=9),
             Settings(temperature=0.6, typical_p=0.8, frequency_penalty=0.5, presence_penalty=0.5, seed=3,
                      max_new_tokens=12, stop=["e"])]
    together = generate(lm, prompt, mixed)
    for c, s in enumerate(mixed):
        alone = generate(lm, prompt, s)[0]
        assert (together[c].token_ids, together[c].text, together[c].beams) == \
            (alone.token_ids, alone.text, alone.beams)
        assert together[c].candidate == c


def test_stream_events_add_up_to_the_result(llama):
    lm, _, prompt = llama
    gen = Generation(lm, prompt, [Settings(seed=s, max_new_tokens=12) for s in range(3)])
    events = list(gen)
    finished = {e.candidate: e for e in events if isinstance(e, Finished)}
    assert sorted(finished) == [0, 1, 2]
    for c, result in finished.items():
        tokens = [e for e in events if isinstance(e, Token) and e.candidate == c]
        assert [t.token_id for t in tokens] == result.token_ids
        assert "".join(t.text for t in tokens) == result.text
        assert [t.step for t in tokens] == list(range(len(tokens)))
        assert result.finish_reason == "length" and len(tokens) == 12
        assert result.timings["prefill_s"] > 0 and result.timings["decode_tokens_per_s"] > 0


def test_token_alternatives_are_the_models_and_the_filtered_distribution(llama):
    lm, _, prompt = llama
    s = Settings(temperature=0.5, top_k=3, top_p=1.0, min_p=0.0, seed=5, max_new_tokens=4)
    tokens = [e for e in Generation(lm, prompt, [s], top_alternatives=5) if isinstance(e, Token)]
    context = list(prompt)
    for t in tokens:
        probs = lm.logits(torch.tensor([context]))[0, -1].softmax(-1)
        top = probs.topk(5)
        assert [a.token_id for a in t.top_before] == top.indices.tolist()
        assert [a.prob for a in t.top_before] == pytest.approx(top.values.tolist(), abs=1e-5)
        after = (lm.logits(torch.tensor([context]))[0, -1] / 0.5).topk(3)
        assert [a.token_id for a in t.top_after[:3]] == after.indices.tolist()
        assert sum(a.prob for a in t.top_after) == pytest.approx(1.0, abs=1e-5)
        assert len(t.top_after) == 3   # the two tokens top-k filtered out are no alternatives
        assert t.logprob == pytest.approx(probs[t.token_id].log().item(), abs=1e-4)
        assert t.piece == lm.tokenizer.decode([t.token_id], skip_special_tokens=False) and t.piece
        context.append(t.token_id)
    plain = [e for e in Generation(lm, prompt, [s], top_alternatives=0) if isinstance(e, Token)]
    assert [t.token_id for t in plain] == [t.token_id for t in tokens] and {t.piece for t in plain} == {""}


def test_a_special_tokens_piece_is_its_name(llama):
    """EOS streams no text, but the inspector shows the token itself."""
    lm, _, prompt = llama
    lm = engine.load(lm.path, device="cpu")   # its own copy: the head is changed so that EOS comes first
    eos = lm.eos_token_ids[0]
    first = generate(lm, prompt, Settings(**GREEDY, max_new_tokens=1))[0].token_ids[0]
    with torch.no_grad():
        lm.model.lm_head.weight[eos] = lm.model.lm_head.weight[first] * 3
    token = next(e for e in Generation(lm, prompt, [Settings(**GREEDY, max_new_tokens=4)]) if isinstance(e, Token))
    assert (token.token_id, token.text, token.piece) == (eos, "", "<|im_end|>")
    assert token.top_before[0].text == "<|im_end|>"


def test_finish_reasons_eos_stop_length_cancelled(llama):
    lm, _, prompt = llama
    eos = frequent_token(lm, prompt, step=3)
    lm.generation_config["eos_token_id"] = [eos]
    try:
        assert generate(lm, prompt, Settings(**GREEDY, max_new_tokens=20))[0].finish_reason == "eos"
    finally:
        del lm.generation_config["eos_token_id"]
    full = generate(lm, prompt, Settings(**GREEDY, max_new_tokens=20))[0]
    assert full.finish_reason == "length"
    stop = full.text[5:8]
    cut = generate(lm, prompt, Settings(**GREEDY, max_new_tokens=20, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]

    gen = Generation(lm, prompt, [Settings(**GREEDY, max_new_tokens=50), Settings(seed=1, max_new_tokens=50)])
    events = []
    for e in gen:
        events.append(e)
        if isinstance(e, Token) and e.candidate == 0 and e.step == 4:
            gen.cancel(0)
    done = {e.candidate: e for e in events if isinstance(e, Finished)}
    assert done[0].finish_reason == "cancelled" and len(done[0].token_ids) == 5
    assert done[1].finish_reason == "length" and len(done[1].token_ids) == 50


def test_cancel_all_stops_everything(llama):
    lm, _, prompt = llama
    gen = Generation(lm, prompt, [Settings(seed=i, max_new_tokens=100) for i in range(2)] +
                     [Settings(**GREEDY, num_beams=2, max_new_tokens=100)])
    events = []
    for e in gen:
        events.append(e)
        if isinstance(e, Token) and e.step == 2:
            gen.cancel()
    reasons = [e.finish_reason for e in events if isinstance(e, Finished)]
    assert reasons == ["cancelled"] * 3
    assert max(e.step for e in events if isinstance(e, Token)) == 2


def test_settings_change_mid_stream_from_the_next_token(llama):
    lm, _, prompt = llama
    gen = Generation(lm, prompt, [Settings(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7,
                                           max_new_tokens=12)])
    ids = []
    for e in gen:
        if isinstance(e, Token):
            ids.append(e.token_id)
            if e.step == 3:
                gen.update(0, Settings(**GREEDY, max_new_tokens=12))
    sampled = generate(lm, prompt, Settings(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7,
                                            max_new_tokens=4))[0].token_ids
    assert ids[:4] == sampled
    greedy_rest = generate(lm, prompt + ids[:4], Settings(**GREEDY, max_new_tokens=8))[0].token_ids
    assert ids[4:] == greedy_rest


def test_segments_record_the_step_each_change_took_effect_at(llama):
    """An update made while token s streams applies from token s + 1: that is the step recorded.
    Two changes before one step make one segment; a change to the same settings makes none."""
    lm, _, prompt = llama
    first = [Settings(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, seed=3, max_new_tokens=12) for _ in range(2)]
    cooler, greedy = Settings(temperature=0.3, top_k=5, seed=3, max_new_tokens=12), Settings(**GREEDY, max_new_tokens=10)
    gen = Generation(lm, prompt, first)
    done = {}
    for e in gen:
        if isinstance(e, Finished):
            done[e.candidate] = e
        elif e.candidate == 0 and e.step == 3:
            gen.update(0, replace(cooler, temperature=0.9))
            gen.update(0, cooler)
            gen.update(1, first[1])
        elif e.candidate == 0 and e.step == 6:
            gen.update(0, greedy)
    assert [(step, s.temperature) for step, s in done[0].segments] == [(0, 1.2), (4, 0.3), (7, 0)]
    assert done[0].segments[2][1].seed == 3   # an update without a seed keeps the running one
    assert done[1].segments == [(0, gen.settings[1])]
    # the same changes scheduled before the start (what a replay does) give the same tokens
    again = Generation(lm, prompt, [first[0]])
    for step, s in done[0].segments[1:]:
        again.update(0, s, step=step)
    replayed = again.run()[0]
    assert replayed.token_ids == done[0].token_ids and replayed.segments == done[0].segments
    assert generate(lm, prompt, first[0])[0].token_ids != done[0].token_ids
    before_any = Generation(lm, prompt, [first[0]])
    before_any.update(0, cooler)   # before the first token: the settings it starts with
    assert before_any.run()[0].segments == [(0, cooler)]


def test_bad_generation_requests(llama):
    lm, _, prompt = llama
    with pytest.raises(ParleyError, match="the prompt is empty"):
        Generation(lm, [], [Settings()])
    with pytest.raises(ParleyError, match="top_p = 0 is out of range"):
        Generation(lm, prompt, [Settings(top_p=0)])
    with pytest.raises(ParleyError, match="model's context holds"):
        Generation(lm, prompt * 200, [Settings()])
    gen = Generation(lm, prompt, [Settings(max_new_tokens=10)])
    with pytest.raises(ParleyError, match="num_beams and num_return_sequences cannot change"):
        gen.update(0, Settings(num_beams=2))
    with pytest.raises(ParleyError, match="max_new_tokens can only be lowered"):
        gen.update(0, Settings(max_new_tokens=11))


def test_unseeded_candidates_record_their_seed(llama):
    lm, _, prompt = llama
    result = generate(lm, prompt, Settings(max_new_tokens=6))[0]
    assert isinstance(result.settings.seed, int)
    again = generate(lm, prompt, result.settings)[0]
    assert again.token_ids == result.token_ids


@pytest.mark.parametrize("name, width", [("llama_gqa_untied", "filled"), ("gpt2", "filled"), ("mistral", "fixed")])
def test_decode_step_compiles_whole_and_gives_the_eager_bits(checkpoints, monkeypatch, name, width):
    """decode_step through a DecodeSlot reads no value back (no .item(): a device sync, which CUDA
    graphs cannot hold), is one graph for torch.compile (fullgraph: no graph break, no branch on a
    value) and computes what the eager step does. Two prompts of different lengths
    take the padded-mask path; Mistral's sliding window the pattern path. "filled" views grow by a
    slot a step (one recompile, then a dynamic length); "fixed" views keep one shape: no recompile."""
    from engine.generate import decode_step, prefill
    from engine.models import linear
    lm = engine.load(checkpoints(name)[0], device="cpu")
    prompts = [lm.tokenizer.encode("Hello there! How are you?"), lm.tokenizer.encode("Hi")]
    n, room = max(map(len, prompts)), 6
    ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
    pad_mask = torch.tensor([[False] * (n - len(p)) + [True] * len(p) for p in prompts])

    def run(step, watch=None):
        cache, logits = prefill(lm.model, ids, pad_mask, n + room)
        out = []
        with torch.inference_mode():
            for _ in range(room - 1):
                slot = cache.decode_slot(n + room if width == "fixed" else None)
                with watch or contextlib.nullcontext():
                    logits = step(lm.model, logits.argmax(-1)[:, None], slot)
                out.append(logits)
        return out

    # The compiled step leaves oneDNN's packed products (engine/models/linear.py) for F.linear;
    # the eager step takes F.linear too here, so that both round alike.
    ops = _OpsSeen()
    with monkeypatch.context() as off:
        off.setattr(linear, "_onednn_dtypes", set())
        eager = run(decode_step, ops)
    aten = torch.ops.aten   # what .item(), int() and bool() of a tensor dispatch to:
    read_back = ops.seen & {aten.item, aten._local_scalar_dense, aten.is_nonzero}
    assert not read_back, f"the decoding step reads values back: {read_back}"
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", width == "fixed")
    compiled = run(torch.compile(decode_step, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)


class _OpsSeen(TorchDispatchMode):
    """Records every ATen operation run under it."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))
