"""Many prompts in one Generation (RLHF rollouts): every candidate gets exactly what it gets alone.

The prompts have different lengths, so the batch is really left-padded; some candidates end at an
EOS mid-run, so rows leave a padded batch; each prompt has several candidates that share its
prefill. The reference is always one prompt and one candidate with the same seed.
"""
import pytest
import torch

import engine
from engine import ParleyError
from engine.generate import Generation, generate, generate_batch
from engine.settings import Settings
from engine.train.ngram import train_ngram
from engine.train.presets import new_lm
from helpers import CORPUS

TEXTS = ["The",  # one token: a trigram's context then reaches into the padding
         "Hello there! How are you doing today? I am fine, thank you.",
         "The quick brown fox jumps over the lazy dog. What is your favourite book? I like reading stories."]
SAMPLE = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
GREEDY = dict(temperature=0, top_k=0, top_p=1.0, min_p=0.0)
MODES = {
    "sample": SAMPLE,
    "greedy": GREEDY,
    # the processors that read each row's own prompt: they fail if a row sees another's
    "repetition": dict(SAMPLE, repetition_penalty=3.0),
    "ngram1": dict(SAMPLE, no_repeat_ngram_size=1),
    "ngram2": dict(GREEDY, no_repeat_ngram_size=2, repetition_penalty=0.7),
}


def prepared(lm):
    """The model with a token it often emits made its EOS, so some candidates end early, and the prompts."""
    prompts = [lm.tokenizer.encode(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    often = generate(lm, prompts[1], Settings(**GREEDY, max_new_tokens=4, min_new_tokens=4))[0].token_ids[3]
    lm.generation_config["eos_token_id"] = [often]
    return lm, prompts


@pytest.fixture(scope="module", params=["llama_gqa_untied", "gpt2"])
def decoder(request, checkpoints):
    return prepared(engine.load(checkpoints(request.param)[0], device="cpu"))


@pytest.fixture(scope="module")
def families(checkpoints, tmp_path_factory):
    """Parley's own families on the tests' tokenizer: random recurrent and NNLM weights, a counted trigram."""
    tok_dir = checkpoints("gpt2")[0]
    text = tmp_path_factory.mktemp("rollouts") / "corpus.txt"
    text.write_text("\n".join(CORPUS) + "\n")
    tok = engine.tokenizer.Tokenizer.from_dir(tok_dir)
    return {"lstm": prepared(new_lm("lstm", tok, 0, hidden_size=32, num_layers=2)),
            "gru": prepared(new_lm("gru", tok, 0, hidden_size=32, num_layers=1)),
            "nnlm": prepared(new_lm("nnlm", tok, 0, context=4, embed_dim=16, hidden_size=32)),
            "ngram": prepared(train_ngram(str(tok_dir), str(text), 3, "kneser_ney"))}


def candidates(extra: dict, k: int, max_new_tokens: int = 12) -> list[list[Settings]]:
    return [[Settings(**extra, seed=100 * i + j, max_new_tokens=max_new_tokens) for j in range(k)]
            for i in range(len(TEXTS))]


def assert_same(got, alone):
    """The same tokens and ends; beam scores to float precision only, as padding moves a row's keys
    in attention's sums (the logits are equal to ~1e-7, not bit for bit)."""
    assert (got.token_ids, got.finish_reason, got.text, got.settings) == \
        (alone.token_ids, alone.finish_reason, alone.text, alone.settings)
    assert [{**b, "score": pytest.approx(b["score"], abs=1e-4)} for b in got.beams] == alone.beams


def assert_as_alone(lm, prompts, settings, results):
    for i, row in enumerate(results):
        assert len(row) == len(settings[i])
        for j, got in enumerate(row):
            assert (got.prompt, got.candidate) == (i, j)
            assert_same(got, generate(lm, prompts[i], [settings[i][j]])[0])


@pytest.mark.parametrize("name", ["llama_gqa_untied", "gpt2", "lstm", "gru", "nnlm", "ngram"])
def test_a_left_padded_forward_equals_each_row_alone(checkpoints, families, name):
    lm, prompts = families[name] if name in families else prepared(engine.load(checkpoints(name)[0], device="cpu"))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    padded = lm.logits(ids, attention_mask=mask)
    for row, p in enumerate(prompts):
        assert torch.allclose(padded[row, width - len(p):], lm.logits(torch.tensor([p]))[0], atol=1e-5), row


@pytest.mark.parametrize("mode", MODES)
def test_each_candidate_of_a_padded_batch_gets_what_it_gets_alone(decoder, mode):
    lm, prompts = decoder
    settings = candidates(MODES[mode], k=3)
    results = generate_batch(lm, prompts, settings)
    assert_as_alone(lm, prompts, settings, results)
    if mode == "sample":   # the batch really lost rows mid-run, and kept others to the end
        assert {f.finish_reason for row in results for f in row} == {"eos", "length"}


@pytest.mark.parametrize("extra", [dict(no_repeat_ngram_size=1), dict(repetition_penalty=100.0)])
def test_padding_is_no_token_to_the_processors(decoder, monkeypatch, extra):
    """Token 0 fills the padding of the prefill's ids; made the model's favourite, it shows whether
    the repetition penalty or the n-gram ban took the padding for a token of the prompt."""
    lm, prompts = decoder
    forward = lm.model.forward

    def favour_0(*args, **kwargs):
        logits = forward(*args, **kwargs)
        return logits.index_add(-1, torch.tensor([0]), torch.full_like(logits[..., :1], 20.0))
    monkeypatch.setattr(lm.model, "forward", favour_0)
    settings = [[Settings(**GREEDY, **extra, max_new_tokens=3, seed=0)] for _ in prompts]
    results = generate_batch(lm, prompts, settings)
    assert results[0][0].token_ids[0] == 0
    assert_as_alone(lm, prompts, settings, results)


def test_candidates_in_any_order_name_their_prompts(decoder):
    lm, prompts = decoder
    prompt_of = [2, 0, 2, 1, 0, 2]
    settings = [Settings(**SAMPLE, seed=7 + c, max_new_tokens=10) for c in range(len(prompt_of))]
    settings[3] = Settings(**GREEDY, num_beams=3, num_return_sequences=2, max_new_tokens=8, seed=1)
    results = Generation(lm, prompts, settings, top_alternatives=0, prompt_of=prompt_of).run()
    for c, (got, p) in enumerate(zip(results, prompt_of)):
        alone = generate(lm, prompts[p], [settings[c]])[0]
        assert (got.candidate, got.prompt) == (c, p)
        assert_same(got, alone)
    assert len(results[3].beams) == 2


def test_beam_search_candidates_with_several_prompts(decoder):
    lm, prompts = decoder
    beam = dict(GREEDY, num_beams=2, repetition_penalty=1.3, no_repeat_ngram_size=2, seed=1)
    settings = [[Settings(**beam, max_new_tokens=8), Settings(**SAMPLE, seed=i, max_new_tokens=8)]
                for i in range(len(prompts))]
    assert_as_alone(lm, prompts, settings, generate_batch(lm, prompts, settings))


@pytest.mark.parametrize("name", ["gpt2", "llama3_tied_scaled"])
def test_max_new_tokens_is_capped_by_each_prompts_own_room(checkpoints, name):
    lm, prompts = prepared(engine.load(checkpoints(name)[0], device="cpu"))
    lm.generation_config["eos_token_id"] = []   # no EOS: every candidate runs to its length limit
    long = (prompts[2] * 20)[:lm.max_context - 5]
    prompts = [prompts[0], long, prompts[1]]
    settings = [[Settings(**SAMPLE, seed=3 * i + j, max_new_tokens=20) for j in range(2)] for i in range(3)]
    results = generate_batch(lm, prompts, settings)
    assert [[len(f.token_ids) for f in row] for row in results] == [[20, 20], [5, 5], [20, 20]]
    assert_as_alone(lm, prompts, settings, results)


@pytest.mark.parametrize("name", ["lstm", "gru", "nnlm", "ngram"])
@pytest.mark.parametrize("mode", ["sample", "ngram2"])
def test_other_families_under_left_padding(families, name, mode):
    lm, prompts = families[name]
    settings = candidates(MODES[mode], k=2, max_new_tokens=8)
    assert_as_alone(lm, prompts, settings, generate_batch(lm, prompts, settings))


def test_chunks_of_whole_prompts_give_the_same_results(decoder, monkeypatch):
    lm, prompts = decoder
    settings = candidates(SAMPLE, k=2)
    settings[1].append(Settings(**GREEDY, num_beams=4, max_new_tokens=6))   # 6 rows: more than a chunk holds
    whole = generate_batch(lm, prompts, settings)
    rows = []
    real = generate

    def counting(lm, prompt_ids, settings, **kwargs):
        rows.append(sum(s.num_beams for s in settings))
        return real(lm, prompt_ids, settings, **kwargs)
    monkeypatch.setattr("engine.generate.generate", counting)
    chunked = generate_batch(lm, prompts * 2, settings * 2, max_rows=4)
    assert rows == [2, 6, 4, 6, 2]   # prompt 0 alone (with 1 it would hold 8), 1 alone, 2 with 0, 1, 2
    assert [[f.token_ids for f in row] for row in chunked] == [[f.token_ids for f in row] for row in whole] * 2
    assert [f.prompt for row in chunked for f in row] == [i for i, row in enumerate(settings * 2) for _ in row]


def test_one_prompt_keeps_the_unpadded_prefill(decoder, monkeypatch):
    lm, prompts = decoder
    masks = []
    forward = lm.model.forward

    def spy(idx, cache=None, pad_mask=None, last_only=False):
        if idx.shape[1] > 1:
            masks.append(pad_mask)
        return forward(idx, cache=cache, pad_mask=pad_mask, last_only=last_only)
    monkeypatch.setattr(lm.model, "forward", spy)
    results = generate(lm, prompts[1], [Settings(**SAMPLE, seed=s, max_new_tokens=4) for s in range(2)])
    assert masks == [None] and [f.prompt for f in results] == [0, 0]
    generate(lm, prompts, [Settings(**SAMPLE, seed=s, max_new_tokens=4) for s in range(3)])
    assert masks[1] is not None and masks[1].sum(1).tolist() == [len(p) for p in prompts]


def test_bad_prompt_of(decoder):
    lm, prompts = decoder
    two = [Settings(max_new_tokens=4)] * 2
    with pytest.raises(ParleyError, match="3 prompts for 2 candidates: give prompt_of"):
        Generation(lm, prompts, two)
    with pytest.raises(ParleyError, match=r"prompt_of must name one prompt \(0 to 2\) for each of the 2"):
        Generation(lm, prompts, two, prompt_of=[0, 3])
    with pytest.raises(ParleyError, match="prompt_of must name one prompt"):
        Generation(lm, prompts, two, prompt_of=[0])
    with pytest.raises(ParleyError, match="prompt_of must name one prompt"):
        Generation(lm, prompts[0], two, prompt_of=[0, 1])
    with pytest.raises(ParleyError, match="prompt 1 is empty"):
        Generation(lm, [prompts[0], []], two)
    with pytest.raises(ParleyError, match="prompt 1 has 5000 tokens"):
        Generation(lm, [prompts[0], [5] * 5000], two)
    with pytest.raises(ParleyError, match="3 prompts and 2 lists of settings"):
        generate_batch(lm, prompts, [two, two])


def test_finished_rows_left_in_the_batch_change_nothing(decoder):
    """Rows that end early stay in the batch, ignored, until a quarter has ended; a candidate
    cancelled meanwhile still ends "cancelled", and the others get what they get alone."""
    lm, prompts = decoder
    settings = [s for row in candidates(SAMPLE, k=4, max_new_tokens=16) for s in row]
    prompt_of = [i for i in range(len(TEXTS)) for _ in range(4)]
    gen = Generation(lm, prompts, settings, top_alternatives=0, prompt_of=prompt_of)
    done, cancelled = {}, None
    for event in gen:
        if hasattr(event, "finish_reason"):
            done[event.candidate] = event
            if cancelled is None and event.finish_reason == "eos":
                cancelled = next(c for c in range(len(settings)) if c not in done)
                gen.cancel(cancelled)
    assert cancelled is not None and done[cancelled].finish_reason == "cancelled"
    assert len(done) == len(settings)
    for c, got in done.items():
        if c != cancelled:
            assert_same(got, generate(lm, prompts[prompt_of[c]], [settings[c]])[0])
