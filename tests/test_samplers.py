"""The samplers beyond transformers' classic ones: epsilon and eta against transformers, DRY, XTC,
top-n-sigma, Mirostat v2 and dynamic temperature against cases worked out by hand from their
definitions (llama.cpp's samplers, the papers), and the sampler order."""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers.generation import logits_process as hf

import engine
from engine import ParleyError, sampling
from engine.generate import Generation, Token
from engine.sampling import RowSettings
from engine.settings import DEFAULT_ORDER, SAMPLERS, Settings, parse_order

VOCAB = 12
OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)   # every classic sampler off


def run(settings_list, scores, ids=None, texts=None, n_generated=None, mu=None):
    """Parley's processors on `scores` [rows, vocab], the context `ids` [rows, length] (-1 = padding)."""
    rows_n, vocab = scores.shape
    ids = torch.zeros(rows_n, 0, dtype=torch.long) if ids is None else ids
    tokenizer = SimpleNamespace(token_texts=texts) if texts is not None else None
    rows = RowSettings(settings_list, "cpu", tokenizer)
    seen = torch.zeros(rows_n, vocab, dtype=torch.bool)
    counts = torch.zeros(rows_n, vocab, dtype=torch.int32)
    n_gen = torch.zeros(rows_n, dtype=torch.long) if n_generated is None else n_generated
    return sampling.process(scores, rows, seen, counts, ids, n_gen, [], mu=mu)


def kept(scores):
    return [i for i, s in enumerate(scores.tolist()) if s > -math.inf]


def log_probs(*probs):
    return torch.tensor([probs]).log()


def randn(rows=4, vocab=VOCAB, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


# -- epsilon and eta: transformers' warpers on the first token ------------------------------------
@pytest.mark.parametrize("name, value, warper", [
    ("epsilon_cutoff", 0.02, hf.EpsilonLogitsWarper),
    ("epsilon_cutoff", 0.2, hf.EpsilonLogitsWarper),
    ("epsilon_cutoff", 0.9, hf.EpsilonLogitsWarper),   # only the top token is above: it stays
    ("eta_cutoff", 0.001, hf.EtaLogitsWarper),
    ("eta_cutoff", 0.05, hf.EtaLogitsWarper),
    ("eta_cutoff", 0.8, hf.EtaLogitsWarper),
])
def test_epsilon_and_eta_match_transformers(name, value, warper):
    scores = randn(6, 50)
    got = run([Settings(**OFF, **{name: value})] * 6, scores)
    want = warper(value)(torch.zeros(6, 1, dtype=torch.long), scores.clone())
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.allclose(got[~got.isinf()], want[~want.isinf()])


def test_epsilon_and_eta_first_token_distribution_matches_transformers(checkpoints):
    """The first token's distribution after the settings, on a real model's logits, with temperature."""
    path, ref = checkpoints("llama_gqa_untied")
    prompt = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        logits = ref(prompt).logits[:, -1].float()
    for name, value, warper in [("epsilon_cutoff", 3e-3, hf.EpsilonLogitsWarper),
                                ("eta_cutoff", 3e-3, hf.EtaLogitsWarper)]:
        got = run([Settings(**{**OFF, "temperature": 0.7}, **{name: value})], logits).softmax(-1)
        warped = warper(value)(prompt, hf.TemperatureLogitsWarper(0.7)(prompt, logits.clone()))
        assert got.gt(0).sum() < logits.shape[-1]   # the cutoff removed something
        assert torch.allclose(got, warped.softmax(-1), atol=1e-6)


def test_rows_with_a_sampler_off_are_untouched():
    scores = randn(2)
    for on in [dict(epsilon_cutoff=0.1), dict(eta_cutoff=0.1), dict(top_n_sigma=0.5), dict(xtc_probability=1.0),
               dict(mirostat_tau=1.0), dict(dynatemp_range=0.5), dict(dry_multiplier=1.0)]:
        ids = torch.tensor([[1, 2, 3, 1, 2], [1, 2, 3, 1, 2]])
        got = run([Settings(**OFF, **on), Settings(**OFF)], scores, ids, texts=["x"] * VOCAB)
        assert torch.equal(got[1], scores[1]), on
        assert not torch.equal(got[0], scores[0]), on


# -- DRY ------------------------------------------------------------------------------------------
DRY = dict(OFF, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, dry_sequence_breakers=["\n"])
TEXTS = [f"t{i}" for i in range(VOCAB)]
TEXTS[5] = "x\n"   # token 5 contains the breaker


def dry_penalty(ids, texts=TEXTS, **settings):
    scores = torch.zeros(1, VOCAB)
    return -run([Settings(**{**DRY, **settings})], scores, torch.tensor([ids]), texts)[0]


def test_dry_penalises_the_token_that_extends_a_repeat():
    # "1 2 3" ends the context and appeared before, followed by 4: emitting 4 makes a repeat of 4
    penalty = dry_penalty([1, 2, 3, 4, 1, 2, 3])
    assert penalty[4] == pytest.approx(0.8 * 1.75 ** (3 - 2))
    assert penalty[[i for i in range(VOCAB) if i != 4]].abs().max() == 0
    assert dry_penalty([1, 2, 3, 4, 1, 2, 3], dry_allowed_length=3)[4] == pytest.approx(0.8)
    assert dry_penalty([1, 2, 3, 4, 1, 2, 3], dry_allowed_length=4).abs().max() == 0   # too short to count


def test_dry_takes_the_longest_repeat_per_token():
    # 4 follows "3" (length 1) and "2 3" (length 2, from "1 2 3"... no: "9 2 3"); 7 follows "1 2 3"
    penalty = dry_penalty([9, 2, 3, 4, 8, 1, 2, 3, 7, 6, 1, 2, 3], dry_allowed_length=1)
    assert penalty[7] == pytest.approx(0.8 * 1.75 ** (3 - 1))   # "1 2 3" then 7
    assert penalty[4] == pytest.approx(0.8 * 1.75 ** (2 - 1))   # "2 3" then 4
    assert penalty[6] == 0


def test_dry_repeats_stop_at_sequence_breakers():
    # token 5 is a breaker: the repeat "1 2 5 3" cannot run across it, so only "3" (length 1) counts
    assert dry_penalty([1, 2, 5, 3, 4, 1, 2, 5, 3]).abs().max() == 0
    no_breakers = ["t"] * VOCAB
    assert dry_penalty([1, 2, 5, 3, 4, 1, 2, 5, 3], texts=no_breakers)[4] == pytest.approx(0.8 * 1.75 ** 2)
    # a breaker is never penalised itself, though it would extend "1 2"
    assert dry_penalty([1, 2, 5, 1, 2]).abs().max() == 0
    assert dry_penalty([1, 2, 5, 1, 2], texts=no_breakers)[5] == pytest.approx(0.8)
    # a context ending in a breaker penalises nothing
    assert dry_penalty([1, 5, 2, 1, 5], dry_allowed_length=1).abs().max() == 0
    assert dry_penalty([1, 5, 2, 1, 5], texts=no_breakers, dry_allowed_length=1)[2] == pytest.approx(0.8 * 1.75)


def test_dry_breakers_are_the_tokens_containing_them():
    texts = ["a", "b:", "c", "\n\n", "*d", "e"]
    mask = sampling.breaker_rows([Settings(), Settings(dry_sequence_breakers=["e"])],
                                 SimpleNamespace(token_texts=texts), "cpu")
    assert mask.tolist() == [[False, True, False, True, True, False], [False] * 5 + [True]]


def test_dry_ignores_padding_and_clamps_the_exponent():
    padded = run([Settings(**DRY)], torch.zeros(1, VOCAB), torch.tensor([[-1, -1, -1, 1, 2, 3, 4, 1, 2, 3]]), TEXTS)
    assert torch.equal(padded, -dry_penalty([1, 2, 3, 4, 1, 2, 3])[None])
    # base 1e10: llama.cpp clamps the exponent at floor(88.72 / ln 1e10) = 3
    penalty = dry_penalty([1, 2, 3, 4, 6, 7, 1, 2, 3, 4, 6], dry_base=1e10, dry_allowed_length=0)
    assert penalty[7] == pytest.approx(0.8 * 1e10 ** 3, rel=1e-5)   # repeat of 5, exponent 5 clamped to 3
    # the same beside a row whose gentler base lets repeats run longer
    ids = torch.tensor([[1, 2, 3, 4, 6, 7, 1, 2, 3, 4, 6]] * 2)
    both = run([Settings(**{**DRY, "dry_base": 1e10, "dry_allowed_length": 0}), Settings(**DRY)],
               torch.zeros(2, VOCAB), ids, TEXTS)
    assert torch.equal(both[0], run([Settings(**{**DRY, "dry_base": 1e10, "dry_allowed_length": 0})],
                                    torch.zeros(1, VOCAB), ids[:1], TEXTS)[0])
    assert both[1, 7] == pytest.approx(-0.8 * 1.75 ** 3)


# -- XTC ------------------------------------------------------------------------------------------
def xtc_kept(probs, threshold, **settings):
    return kept(run([Settings(**OFF, xtc_threshold=threshold, xtc_probability=1.0, **settings)], log_probs(*probs))[0])


def test_xtc_removes_the_top_choices_but_the_least_likely_of_them():
    assert xtc_kept([0.4, 0.3, 0.2, 0.1], 0.15) == [2, 3]   # 0.4 and 0.3 go, 0.2 (the last above) stays
    assert xtc_kept([0.1, 0.2, 0.3, 0.4], 0.25) == [0, 1, 2]
    assert xtc_kept([0.4, 0.3, 0.2, 0.1], 0.35) == [0, 1, 2, 3]   # one above the threshold: nothing goes
    assert xtc_kept([0.4, 0.3, 0.2, 0.1], 0.5) == [0, 1, 2, 3]    # none above
    assert xtc_kept([0.4, 0.25, 0.25, 0.1], 0.2) == [1, 2, 3]     # ties at the least top probability stay
    # threshold 0: every token still in play is a top choice; a filtered one never comes back
    assert xtc_kept([0.5, 0.3, 0.2, 0.0], 0.0) == [2]


def test_xtc_coin_is_the_rows_own_and_comes_up_at_its_probability():
    seeds = list(range(400))
    settings = [Settings(**{**OFF, "seed": s}, xtc_threshold=0.15, xtc_probability=0.3) for s in seeds]
    scores = log_probs(0.4, 0.3, 0.2, 0.1).expand(len(seeds), -1)
    step = torch.full((len(seeds),), 3)
    acted = run(settings, scores, n_generated=step)[:, 0].isinf()
    assert 0.22 < acted.float().mean() < 0.38
    # each row alone draws the same coin; another step draws another
    alone = [bool(run([s], scores[:1], n_generated=step[:1])[0, 0].isinf()) for s in settings[:40]]
    assert alone == acted[:40].tolist()
    assert not torch.equal(run(settings, scores, n_generated=step + 1)[:, 0].isinf(), acted)


# -- top-n-sigma ----------------------------------------------------------------------------------
def sigma_kept(logits, n, **settings):
    return kept(run([Settings(**{**OFF, **settings}, top_n_sigma=n)], torch.tensor([logits]))[0])


def test_top_n_sigma_keeps_logits_within_n_deviations_of_the_top():
    # mean 1.5, population deviation sqrt(1.25) = 1.118: the edge is 3 - n x 1.118
    assert sigma_kept([3.0, 2.0, 1.0, 0.0], 1.0) == [0, 1]
    assert sigma_kept([3.0, 2.0, 1.0, 0.0], 2.0) == [0, 1, 2]
    assert sigma_kept([3.0, 2.0, 1.0, 0.0], 0.5) == [0]
    # temperature scales the top and the deviation alike: the same tokens stay
    assert sigma_kept([3.0, 2.0, 1.0, 0.0], 1.0, temperature=0.4) == [0, 1]


def test_top_n_sigma_ties_and_filtered_tokens():
    # mean 1, deviation 1: with n = 2 the edge is exactly 0, and the tokens at the edge stay
    assert sigma_kept([2.0, 0.0, 2.0, 0.0], 2.0) == [0, 1, 2, 3]
    assert sigma_kept([2.0, 0.0, 2.0, 0.0], 1.9) == [0, 2]        # both tied top tokens
    # tokens already filtered out count for neither the mean nor the deviation
    assert sigma_kept([2.0, 0.0, 2.0, 0.0] + [-math.inf] * 4, 2.0) == [0, 1, 2, 3]
    assert sigma_kept([2.0, 0.0, 2.0, 0.0] + [-math.inf] * 4, 1.9) == [0, 2]
    assert sigma_kept([1.0, 1.0, 1.0], 0.1) == [0, 1, 2]           # deviation 0: all tie with the top


# -- Mirostat v2 ----------------------------------------------------------------------------------
def test_mirostat_truncates_at_mu_and_moves_mu_by_the_surprise():
    scores = log_probs(0.5, 0.25, 0.125, 0.125)   # surprises 1, 2, 3, 3 bits
    settings = [Settings(**OFF, mirostat_tau=1.5, mirostat_eta=0.2)]
    assert kept(run(settings, scores)[0]) == [0, 1, 2, 3]                       # mu starts at 2 tau = 3
    out = run(settings, scores, mu=torch.tensor([[2.5]]))[0]
    assert kept(out) == [0, 1]
    assert out.softmax(-1)[:2].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert kept(run(settings, scores, mu=torch.tensor([[0.5]]))[0]) == [0]       # the top token always stays
    # token 1 drawn from the truncated 2/3, 1/3: surprise log2(3) bits, mu' = 2.5 - 0.2 (log2 3 - 1.5)
    rows = RowSettings(settings, "cpu")
    mu = sampling.mirostat_update(torch.tensor([[2.5]]), rows, torch.tensor([[math.log(1 / 3)]]))
    assert mu.item() == pytest.approx(2.5 - 0.2 * (math.log2(3) - 1.5))


@pytest.fixture(scope="module")
def llama(checkpoints):
    path, _ = checkpoints("llama_gqa_untied")
    return engine.load(path, device="cpu")


def test_mirostat_state_is_per_row_across_steps(llama):
    """Each drawn token obeys the mu its row's own earlier tokens set, and a row decodes the same
    alone and beside others."""
    tau, eta_ = 2.0, 0.5
    miro = Settings(**{**OFF, "seed": 11}, mirostat_tau=tau, mirostat_eta=eta_, max_new_tokens=24)
    other = Settings(**{**OFF, "seed": 3}, max_new_tokens=24)
    prompt = [1, 5, 9, 14, 3]
    events = [e for e in Generation(llama, prompt, [other, miro, miro]) if isinstance(e, Token)]
    mine = [e for e in events if e.candidate == 1]
    # by hand: the model's distribution at each step, cut at the mu the row's earlier tokens left
    ids, mu, checked, truncated = list(prompt), 2 * tau, 0, 0
    for e in mine:
        with torch.no_grad():
            logp = llama.logits(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
        surprise = -logp / math.log(2)
        keep = (surprise <= mu) | (logp == logp.max())
        assert keep[e.token_id]
        if not ((surprise - mu).abs() < 1e-3).any():   # no token on the edge, where rounding could decide
            assert e.sampled_logprob == pytest.approx(float(logp[e.token_id] - logp[keep].logsumexp(0)), abs=1e-3)
            checked += 1
        truncated += int(not keep.all())
        mu -= eta_ * (-e.sampled_logprob / math.log(2) - tau)
        ids.append(e.token_id)
    assert checked > len(mine) // 2 and truncated > 0   # mu did cut the distribution
    alone = [e.token_id for e in Generation(llama, prompt, [miro]) if isinstance(e, Token)]
    assert alone == [e.token_id for e in mine] == [e.token_id for e in events if e.candidate == 2]


# -- dynamic temperature --------------------------------------------------------------------------
def test_dynamic_temperature_follows_the_normalised_entropy():
    # uniform over 4 tokens: normalised entropy 1, so the temperature is t + range
    settings = Settings(**{**OFF, "temperature": 1.0}, dynatemp_range=0.5, dynatemp_exponent=2.0)
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, -math.inf]])
    assert torch.allclose(run([settings], scores)[0, :4], torch.full((4,), 1 / 1.5))
    scores = randn(1, 6)
    p = scores.softmax(-1)
    normalised = float(-(p * p.log()).sum() / math.log(6))
    t = 0.5 + (1.5 - 0.5) * normalised ** 2
    assert torch.allclose(run([settings], scores), scores / t)
    # temperature 0.3 - range 0.5 is clamped at 0; one token left means entropy 0: only it stays
    low = Settings(**{**OFF, "temperature": 0.3}, dynatemp_range=0.5)
    one = torch.tensor([[2.0, -math.inf, -math.inf]])
    assert kept(run([low], one)[0]) == [0]


# -- the order ------------------------------------------------------------------------------------
def test_default_order_is_the_classic_one():
    assert parse_order(DEFAULT_ORDER) == SAMPLERS
    assert SAMPLERS[:4] == ("penalties", "no_repeat_ngram", "dry", "temperature")
    assert Settings().sampler_order == DEFAULT_ORDER


def test_sampler_order_changes_what_runs_first():
    scores = randn(1, 20)
    base = {**OFF, "temperature": 2.0, "min_p": 0.2}
    default = run([Settings(**base)], scores)
    first = run([Settings(**base, sampler_order="min_p,temperature")], scores)
    assert torch.equal(default, sampling.min_p(scores / 2.0, torch.tensor([[0.2]]), torch.tensor([[True]])))
    assert torch.equal(first, sampling.min_p(scores, torch.tensor([[0.2]]), torch.tensor([[True]])) / 2.0)
    assert kept(first[0]) != kept(default[0])


def test_rows_with_different_orders_share_a_batch():
    scores = randn(3, 20)
    settings = [Settings(**{**OFF, "temperature": 2.0, "min_p": 0.2, "top_k": 6}, sampler_order=order)
                for order in ("min_p,temperature", DEFAULT_ORDER, "top_k,min_p")]
    together = run(settings, scores)
    for i, s in enumerate(settings):
        assert torch.equal(together[i], run([s], scores[i:i + 1])[0])


@pytest.mark.parametrize("order, named", [("top_k,topk", "'topk'"), ("xtc,top_k,xtc", "'xtc' twice")])
def test_a_bad_sampler_order_is_one_line_naming_it(order, named):
    with pytest.raises(ParleyError) as e:
        Settings(sampler_order=order).validate()
    assert named in str(e.value) and "\n" not in str(e.value)


def test_old_saved_settings_load_and_new_ones_round_trip():
    old = {k: v for k, v in Settings(seed=5).to_dict().items()
           if k in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "seed", "stop")}
    assert Settings.from_dict(old) == Settings(seed=5)
    new = Settings(dry_multiplier=0.8, xtc_probability=0.5, sampler_order="xtc,dry", dry_sequence_breakers=["#"])
    assert Settings.from_dict(new.to_dict()) == new


@pytest.mark.parametrize("field, value", [("xtc_threshold", 0.6), ("epsilon_cutoff", 1.0), ("dry_base", 0.5),
                                          ("dynatemp_exponent", 0.0), ("dry_sequence_breakers", [""]),
                                          ("mirostat_eta", 0.0)])
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(ParleyError, match=field):
        Settings(**{field: value}).validate()
