"""Every processor against transformers' LogitsProcessor on the same logits, edge cases included."""
import math

import pytest
import torch
from transformers.generation import logits_process as hf

from engine import ParleyError
from engine import sampling
from engine.sampling import RowSettings
from engine.settings import Settings

VOCAB = 50


def logits(rows=3, seed=0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def history(rows=3, length=12, seed=1):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def ours(settings_list, scores, ids, n_prompt=None, eos=(7,)):
    """Run Parley's processors with prompt = ids[:, :n_prompt] and output = the rest."""
    n_prompt = ids.shape[1] if n_prompt is None else n_prompt
    rows = RowSettings(settings_list, "cpu")
    seen = torch.zeros(len(ids), VOCAB, dtype=torch.bool)
    seen.scatter_(1, ids[:, :n_prompt], True)
    counts = torch.zeros(len(ids), VOCAB, dtype=torch.int32)
    counts.scatter_add_(1, ids[:, n_prompt:], torch.ones_like(ids[:, n_prompt:], dtype=torch.int32))
    n_gen = torch.full((len(ids),), ids.shape[1] - n_prompt)
    return sampling.process(scores, rows, seen, counts, ids, n_gen, list(eos))


def same(a, b):
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "different tokens were filtered"
    finite = ~torch.isinf(a)
    assert torch.allclose(a[finite], b[finite], atol=1e-6)


NEUTRAL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.mark.parametrize("setting, value, processor", [
    ("temperature", 0.7, lambda v: hf.TemperatureLogitsWarper(v)),
    ("temperature", 1.6, lambda v: hf.TemperatureLogitsWarper(v)),
    ("top_k", 5, lambda v: hf.TopKLogitsWarper(v)),
    ("top_k", 1, lambda v: hf.TopKLogitsWarper(v)),
    ("top_k", 500, lambda v: hf.TopKLogitsWarper(v)),
    ("top_p", 0.9, lambda v: hf.TopPLogitsWarper(v)),
    ("top_p", 0.3, lambda v: hf.TopPLogitsWarper(v)),
    ("top_p", 1e-9, lambda v: hf.TopPLogitsWarper(v)),   # keeps at least one token
    ("min_p", 0.1, lambda v: hf.MinPLogitsWarper(v)),
    ("min_p", 0.9, lambda v: hf.MinPLogitsWarper(v)),
    ("typical_p", 0.5, lambda v: hf.TypicalLogitsWarper(v)),
    ("typical_p", 0.95, lambda v: hf.TypicalLogitsWarper(v)),
    ("repetition_penalty", 1.3, lambda v: hf.RepetitionPenaltyLogitsProcessor(v)),
    ("repetition_penalty", 0.8, lambda v: hf.RepetitionPenaltyLogitsProcessor(v)),
    ("no_repeat_ngram_size", 2, lambda v: hf.NoRepeatNGramLogitsProcessor(v)),
    ("no_repeat_ngram_size", 3, lambda v: hf.NoRepeatNGramLogitsProcessor(v)),
    ("no_repeat_ngram_size", 1, lambda v: hf.NoRepeatNGramLogitsProcessor(v)),
])
def test_each_processor_equals_transformers(setting, value, processor):
    scores, ids = logits(), history()
    if setting == "no_repeat_ngram_size":
        ids[:, -2:] = ids[:, 3:5]  # make sure some n-grams repeat
    expected = processor(value)(ids, scores.clone())
    got = ours([Settings(**{**NEUTRAL, setting: value})] * len(ids), scores, ids)
    same(got, expected)


def test_ties_at_the_kth_logit_are_all_kept():
    scores = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0] + [-1.0] * (VOCAB - 6)])
    expected = hf.TopKLogitsWarper(2)(None, scores.clone())
    got = ours([Settings(**{**NEUTRAL, "top_k": 2})], scores, history(1))
    same(got, expected)
    assert (~torch.isinf(got)).sum() == 4


@pytest.mark.parametrize("name, value, processor", [
    ("top_p", 0.05, hf.TopPLogitsWarper),
    ("min_p", 0.99, hf.MinPLogitsWarper),
    ("typical", 0.05, hf.TypicalLogitsWarper),
])
def test_min_tokens_to_keep(name, value, processor):
    scores = logits(2)
    expected = processor(value, min_tokens_to_keep=3)(None, scores.clone())
    on = torch.ones(2, 1, dtype=torch.bool)
    got = getattr(sampling, name)(scores.clone(), torch.full((2, 1), value), on, min_keep=3)
    same(got, expected)
    assert ((~torch.isinf(got)).sum(-1) >= 3).all()


def test_min_new_tokens_blocks_every_eos():
    scores, ids = logits(1), history(1)
    expected = hf.MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=8, min_new_tokens=6,
                                                    eos_token_id=[7, 9])(ids, scores.clone())
    got = ours([Settings(**NEUTRAL, min_new_tokens=6, max_new_tokens=10)], scores, ids, n_prompt=8, eos=(7, 9))
    same(got, expected)
    assert torch.isinf(got[0, 7]) and torch.isinf(got[0, 9])
    allowed = ours([Settings(**NEUTRAL, min_new_tokens=4)], scores, ids, n_prompt=8, eos=(7, 9))
    assert not torch.isinf(allowed).any()


def test_full_chain_in_transformers_order():
    scores, ids = logits(), history()
    s = Settings(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, typical_p=0.9, repetition_penalty=1.2,
                 no_repeat_ngram_size=2)
    chain = hf.LogitsProcessorList([
        hf.RepetitionPenaltyLogitsProcessor(1.2), hf.NoRepeatNGramLogitsProcessor(2),
        hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.8),
        hf.MinPLogitsWarper(0.05), hf.TypicalLogitsWarper(0.9)])
    same(ours([s] * 3, scores, ids), chain(ids, scores.clone()))


def test_rows_with_mixed_settings_each_get_what_they_get_alone():
    scores, ids = logits(4), history(4)
    mixed = [Settings(temperature=0.5, top_k=3, top_p=1.0, min_p=0.0),
             Settings(temperature=1.0, top_k=0, top_p=0.6, min_p=0.0, repetition_penalty=1.5),
             Settings(temperature=0, no_repeat_ngram_size=2),
             Settings(temperature=1.2, top_k=0, top_p=1.0, min_p=0.2, typical_p=0.7)]
    together = ours(mixed, scores, ids)
    for row, s in enumerate(mixed):
        alone = ours([s], scores[row:row + 1], ids[row:row + 1])
        same(together[row:row + 1], alone)


def test_frequency_and_presence_penalties_follow_openai():
    scores, ids = logits(1), history(1, length=10)
    ids[0, 4:] = torch.tensor([3, 3, 3, 8, 8, 11])  # output: token 3 three times, 8 twice, 11 once
    got = ours([Settings(**NEUTRAL, frequency_penalty=0.5, presence_penalty=0.25)], scores, ids, n_prompt=4)
    expected = scores.clone()
    for token, count in {3: 3, 8: 2, 11: 1}.items():
        expected[0, token] -= 0.5 * count + 0.25
    same(got, expected)


def test_greedy_rows_ignore_temperature_and_filters():
    scores, ids = logits(1), history(1)
    got = ours([Settings(temperature=0, top_k=1, top_p=0.1)], scores, ids)
    same(got, scores)


def test_sampler_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1] + [0.0] * (VOCAB - 4))
    scores = probs.log()[None].expand(4000, -1)
    draws = sampling.sample(scores, torch.arange(4000), torch.zeros(4000, dtype=torch.long))
    freq = torch.bincount(draws, minlength=VOCAB).float() / 4000
    assert (freq[4:] == 0).all()
    # four standard errors at n = 4000 is below 0.032 for every p here
    assert (freq[:4] - probs[:4]).abs().max() < 0.032


def test_sampler_noise_depends_only_on_seed_and_step():
    a = sampling.uniform_noise(torch.tensor([1, 2, 3]), torch.tensor([5, 5, 5]), VOCAB)
    b = sampling.uniform_noise(torch.tensor([3, 9]), torch.tensor([5, 5]), VOCAB)
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert ((a > 0) & (a < 1)).all()
    assert abs(a.mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("changes, message", [
    (dict(top_p=0), r"top_p = 0 is out of range: it must be in \(0, 1\]"),
    (dict(temperature=-0.5), r"temperature = -0.5 is out of range: it must be between 0 \(greedy\) and 100"),
    (dict(num_beams=0), r"num_beams = 0 is out of range: it must be 1 or more"),
    (dict(top_k=-1), r"top_k = -1 is out of range"),
    (dict(min_p=1.5), r"min_p = 1.5 is out of range"),
    (dict(typical_p=0), r"typical_p = 0 is out of range"),
    (dict(repetition_penalty=0), r"repetition_penalty = 0 is out of range"),
    (dict(max_new_tokens=0), r"max_new_tokens = 0 is out of range"),
    (dict(min_new_tokens=9, max_new_tokens=5), r"min_new_tokens = 9 is out of range"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences = 3 is out of range"),
    (dict(temperature=math.nan), r"temperature = nan is out of range: it must be a number"),
    (dict(stop=[""]), r"stop = \[''\] is out of range"),
    (dict(early_stopping="sometimes"), r"early_stopping = 'sometimes' is out of range"),
])
def test_invalid_settings_are_named_with_their_range(changes, message):
    with pytest.raises(ParleyError, match=message):
        Settings(**changes).validate()


def test_unknown_setting_is_named():
    with pytest.raises(ParleyError, match="unknown decoding setting 'topp'"):
        Settings.from_dict({"topp": 0.9})
