"""n-gram models: hand-computed probabilities, normalisation, back-off, files and decoding."""
import numpy as np
import pytest

import engine
from engine.generate import generate
from engine.models.ngram import METHODS, NGramLM, _katz_discounts
from engine.settings import Settings

# BOS is 0; the vocabulary is 0..4. Padded for bigrams: [0 1 2 3] and [0 1 2 2].
CORPUS = [[1, 2, 3], [1, 2, 2]]


def p(lm, context, word):
    return float(lm.prob(np.array([context]), np.array([word]))[0])


def test_mle_by_hand():
    lm = NGramLM(2, 5, 0, "mle").fit(CORPUS)
    assert p(lm, [1], 2) == 1.0                  # c(1 2) / c(1) = 2 / 2
    assert p(lm, [2], 3) == p(lm, [2], 2) == 0.5  # 1 / 2 each
    assert p(lm, [2], 1) == 0.0
    assert p(lm, [4], 2) == 0.5                  # context 4 never seen: unigram 3 / 6


def test_laplace_by_hand():
    lm = NGramLM(2, 5, 0, "add_k", k=1).fit(CORPUS)
    assert p(lm, [2], 3) == pytest.approx(2 / 7)  # (1 + 1) / (2 + 5)
    assert p(lm, [2], 1) == pytest.approx(1 / 7)
    assert p(lm, [4], 1) == pytest.approx(3 / 11)  # back-off: (2 + 1) / (6 + 5)
    half = NGramLM(2, 5, 0, "add_k", k=0.5).fit(CORPUS)
    assert p(half, [2], 3) == pytest.approx(1.5 / 4.5)


def test_kneser_ney_by_hand():
    lm = NGramLM(2, 5, 0, "kneser_ney").fit(CORPUS)
    # Unigram level on continuation counts N1+(. w): w=1: 1, w=2: 2 (after 1 and 2), w=3: 1; total 4.
    # Counts-of-counts n1=2, n2=1, n3=0: too few for modified KN, so D = n1 / (n1 + 2 n2) = 0.5.
    # gamma = 0.5 x 3 distinct / 4 = 0.375, spread uniformly over 5 tokens: 0.075 each.
    assert p(lm, [4], 1) == pytest.approx(0.5 / 4 + 0.075)   # = 0.2, via back-off from context 4
    assert p(lm, [4], 2) == pytest.approx(1.5 / 4 + 0.075)   # = 0.45
    assert p(lm, [4], 0) == pytest.approx(0.075)
    # Bigram level on raw counts: (0 1): 2, (1 2): 2, (2 3): 1, (2 2): 1 -> n1=2, n2=2: D = 2 / 6.
    # P(3 | 2) = (1 - 1/3) / 2 + gamma(2) P1(3), gamma(2) = (1/3 x 2) / 2 = 1/3, P1(3) = 0.2.
    assert p(lm, [2], 3) == pytest.approx(1 / 3 + 1 / 15)
    assert p(lm, [2], 1) == pytest.approx(1 / 15)


def test_modified_kneser_ney_discounts_by_hand():
    from engine.models.ngram import _kn_discounts
    d1, d2, d3 = _kn_discounts([0, 10, 5, 3, 2])
    y = 10 / (10 + 2 * 5)
    assert (d1, d2, d3) == pytest.approx((1 - 2 * y * 5 / 10, 2 - 3 * y * 3 / 5, 3 - 4 * y * 2 / 3))


def test_katz_discounts_by_hand():
    # n1..n6 = 20, 8, 4, 3, 2, 1: r* = (r + 1) n_{r+1} / n_r, and (k + 1) n_{k+1} / n1 = 6 / 20 = 0.3
    d = _katz_discounts([0, 20, 8, 4, 3, 2, 1, 0])
    expected = [1.0] + [((r_star / r) - 0.3) / 0.7 for r, r_star in
                        ((1, 2 * 8 / 20), (2, 3 * 4 / 8), (3, 4 * 3 / 4), (4, 5 * 2 / 3), (5, 6 * 1 / 2))]
    assert d.tolist() == pytest.approx(expected)


def test_katz_backs_off_in_proportion_to_the_lower_order():
    rng = np.random.default_rng(1)
    seqs = [list(np.minimum(rng.zipf(1.5, size=rng.integers(5, 40)), 250)) for _ in range(300)]
    lm = NGramLM(2, 256, 0, "katz").fit(seqs)
    dist = lm.distribution([2])
    unigram = NGramLM(1, 256, 0, "katz").fit(seqs).distribution([])
    seen = set(lm.keys[1][lm.keys[1] // 256 == 2] % 256)
    unseen = [w for w in range(256) if w not in seen and unigram[w] > 0]
    assert len(unseen) > 3
    ratios = dist[unseen] / unigram[unseen]
    assert np.allclose(ratios, ratios[0])        # one alpha(h) for every unseen word
    assert dist.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_every_distribution_sums_to_one(method, order):
    rng = np.random.default_rng(order)
    seqs = [list(rng.integers(1, 40, size=rng.integers(2, 30))) for _ in range(200)]
    lm = NGramLM(order, 50, 0, method).fit(seqs)
    contexts = [list(rng.integers(0, 50, size=rng.integers(0, 6))) for _ in range(20)] + [s[:4] for s in seqs[:10]]
    for context in contexts:
        assert lm.distribution(context).sum() == pytest.approx(1.0, abs=1e-9)


def test_deterministic_and_backs_off_for_unseen_contexts():
    lm = NGramLM(3, 5, 0, "kneser_ney").fit(CORPUS)
    assert np.array_equal(lm.distribution([4, 4]), lm.distribution([4, 4]))
    assert np.allclose(lm.distribution([4, 4]), lm.distribution([4]))  # nothing seen: the unigram level


def test_expected_order_on_a_small_corpus():
    from engine.train.tokenizer import train_tokenizer
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat log big small red blue".split()
    text = [" ".join(rng.choice(words, size=rng.integers(4, 12))) for _ in range(1500)]
    tok = train_tokenizer(text, 300)
    ids = [tok.encode(t, add_special_tokens=False) for t in text]
    train, test = ids[:1350], ids[1350:]

    def ppl(lm):
        logp = np.concatenate([np.log(lm.distributions([s[:i] for i in range(len(s))])[np.arange(len(s)), s])
                               for s in test])
        return float(np.exp(-logp.mean()))
    scores = {m: ppl(NGramLM(3, tok.vocab_size, 0, m, k=1.0).fit(train)) for m in ("add_k", "katz", "kneser_ney")}
    assert scores["add_k"] > scores["katz"] > scores["kneser_ney"]


def test_skewed_counts_never_make_a_continuation_impossible():
    # Every bigram is seen twice or more (no singletons) and context 1 is always followed by 2, more
    # than KATZ_MAX times: Katz keeps no mass there and KN's absolute discount would be 0 without
    # the fallbacks, which would give the unseen bigram (1 3) probability 0 (infinite perplexity).
    corpus = [[1, 2]] * 8 + [[3, 4]] * 2 + [[4, 3]] * 2
    for method in ("katz", "kneser_ney"):
        lm = NGramLM(2, 5, 0, method).fit(corpus)
        assert p(lm, [1], 3) > 0, method
        assert lm.distribution([1]).sum() == pytest.approx(1.0), method
    katz = NGramLM(2, 5, 0, "katz").fit(corpus)
    # Witten-Bell's reserve for context 1: 1 distinct continuation / (8 + 1), shared by the rest
    assert 1 - p(katz, [1], 2) == pytest.approx(1 / 9)


def test_save_load_and_decode(tmp_path):
    from engine.train.ngram import train_ngram
    from engine.train.tokenizer import train_tokenizer
    conversations = [[{"role": "user", "content": f"hello number {i}"}, {"role": "assistant", "content": "hi there!"}]
                     for i in range(50)]
    (tmp_path / "chat.jsonl").write_text("".join(__import__("json").dumps({"messages": c}) + "\n"
                                                 for c in conversations))
    train_tokenizer(conversations, 300).save(tmp_path / "tok")
    lm = train_ngram(str(tmp_path / "tok"), str(tmp_path / "chat.jsonl"), 3, "kneser_ney")
    lm.save(tmp_path / "kn")
    again = engine.load(tmp_path / "kn", device="cpu")
    prompt = again.tokenizer.encode_chat([{"role": "user", "content": "hello number 7"}])
    for settings in (Settings(temperature=0, max_new_tokens=10), Settings(seed=1, max_new_tokens=10),
                     Settings(temperature=0, num_beams=3, max_new_tokens=10)):
        reply = generate(again, prompt, settings)[0]
        assert reply.text == "hi there!" and reply.finish_reason == "eos"
