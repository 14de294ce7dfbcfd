"""ELMo: the character CNN, the biLM's two losses against LSTMs written out by hand, which context
each direction sees, the scalar mix by hand, the model protocol (cache, padding, eval), the
tokenizer against word2vec's words, a planted two-sense word, the model directory and bad input."""
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from bad_input import assert_one_line_error, run_cli

import engine
from engine.models.elmo import (
    BOS_CHAR,
    BOW_CHAR,
    EOW_CHAR,
    SPECIALS,
    BiLM,
    BiLMConfig,
    ScalarMix,
    characters,
    contextual_neighbours,
    contextual_vectors,
    reverse_real,
    word_tokenizer,
)
from engine.models.word2vec import words
from engine.train.config import ElmoConfig, Word2VecConfig
from engine.train.elmo import Rows, train_elmo
from engine.train.evaluate import evaluate
from engine.train.word2vec import train_word2vec

WORDS = [*SPECIALS, "the", "river", "bank", "money", "café", "ran"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors are tiny: threads only wait on each other (and on the other tests' processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bilm(seed: int = 0, vocab: list[str] = WORDS) -> BiLM:
    torch.manual_seed(seed)
    config = BiLMConfig(vocab_size=len(vocab), max_characters=10, char_dim=4, filters=((1, 3), (2, 4), (3, 5)),
                        highway_layers=2, projection_dim=6, hidden_size=7)
    model = BiLM(config)
    model.set_vocabulary(vocab)
    return model.eval()


# -- the token encoder --

def test_characters_mark_each_word():
    assert characters("ab", 6) == [BOW_CHAR, ord("a") + 1, ord("b") + 1, EOW_CHAR, 0, 0]
    assert characters("<s>", 4) == [BOW_CHAR, BOS_CHAR, EOW_CHAR, 0]
    assert characters("café", 6) == [BOW_CHAR, *(b + 1 for b in b"caf"), 0xC3 + 1, EOW_CHAR]  # cut to fit
    assert len(characters("a" * 30, 10)) == 10


def test_char_cnn_by_hand():
    model = tiny_bilm()
    enc = model.encoder
    chars = model.char_table[5]                                          # "bank"
    e = enc.embed.weight[chars]                                          # [max_characters, char_dim]
    pooled = []
    for conv in enc.convs:
        w, b = conv.weight, conv.bias                                    # [n, char_dim, width]
        width = w.shape[-1]
        windows = torch.stack([e[i:i + width].T for i in range(len(chars) - width + 1)])   # [positions, dim, width]
        pooled.append(F.relu((torch.einsum("pdk,ndk->pn", windows, w) + b).max(0).values))
    x = torch.cat(pooled)
    for highway in enc.highways:
        h, g = (highway.weight @ x + highway.bias).chunk(2)
        x = torch.sigmoid(g) * x + (1 - torch.sigmoid(g)) * F.relu(h)
    expected = enc.projection.weight @ x + enc.projection.bias
    torch.testing.assert_close(enc(chars[None, None])[0, 0], expected, rtol=1e-5, atol=1e-6)


# -- the two language models, by hand --

def lstm_by_hand(lstm: torch.nn.LSTM, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The LSTM-with-projection equations, one step at a time: gates i, f, g, o; c = f c + i g;
    h = W_hr (o tanh c)."""
    h = torch.zeros(lstm.proj_size)
    c = torch.zeros(lstm.hidden_size)
    out = []
    for x in xs:
        i, f, g, o = (lstm.weight_ih_l0 @ x + lstm.bias_ih_l0 + lstm.weight_hh_l0 @ h + lstm.bias_hh_l0).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = lstm.weight_hr_l0 @ (torch.sigmoid(o) * torch.tanh(c))
        out.append(h)
    return out


def direction_by_hand(lstms, xs):
    first = lstm_by_hand(lstms[0], xs)
    second = lstm_by_hand(lstms[1], first)
    return [a + b for a, b in zip(first, second)]   # the residual connection


def nll(model, h, target) -> float:
    return -torch.log_softmax(model.lm_head.weight @ h, 0)[target].item()


@torch.no_grad()
def test_losses_against_lstms_by_hand():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 5, 4, 2], [1, 6, 5, 2, 0]])
    pad = torch.tensor([[True] * 5, [True] * 4 + [False]])
    fwd, bwd = model.losses(ids, pad_mask=pad)
    f_terms, b_terms = [], []
    for row, length in zip(ids, pad.sum(1).tolist()):
        xs = list(model.encoder(model.char_table[row[:length]]))
        forward = direction_by_hand(model.forward_lstms, xs)
        backward = direction_by_hand(model.backward_lstms, xs[::-1])[::-1]
        f_terms += [nll(model, forward[t], row[t + 1]) for t in range(length - 1)]
        b_terms += [nll(model, backward[t], row[t - 1]) for t in range(1, length)]
    assert fwd.item() == pytest.approx(sum(f_terms) / len(f_terms), rel=1e-5)
    assert bwd.item() == pytest.approx(sum(b_terms) / len(b_terms), rel=1e-5)


@torch.no_grad()
def test_each_direction_sees_only_its_side():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 4, 5, 6, 2]])
    changed = ids.clone()
    changed[0, 3] = 7                                                   # the word at position 3
    _, f1, b1 = model.directions(model.char_table[ids])
    _, f2, b2 = model.directions(model.char_table[changed])
    for a, b in zip(f1 + b1, f2 + b2):
        assert not torch.allclose(a[0, 3], b[0, 3])                     # both directions read the word itself
    for a, b in zip(f1, f2):                                            # forward: only what is left of it
        torch.testing.assert_close(a[0, :3], b[0, :3])
        assert all(not torch.allclose(a[0, t], b[0, t]) for t in range(3, 6))
    for a, b in zip(b1, b2):                                            # backward: only what is right of it
        torch.testing.assert_close(a[0, 4:], b[0, 4:])
        assert all(not torch.allclose(a[0, t], b[0, t]) for t in range(4))


@torch.no_grad()
def test_padding_left_or_right_changes_no_state():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 5, 6, 2]])
    alone = model.layers(model.char_table[ids])
    for padded, pad, real in ((torch.tensor([[0, 0, 1, 3, 5, 6, 2]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1]]), slice(2, 7)),
                              (torch.tensor([[1, 3, 5, 6, 2, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1, 0, 0]]), slice(0, 5))):
        for a, b in zip(alone, model.layers(model.char_table[padded], pad.bool())):
            torch.testing.assert_close(b[:, real], a, rtol=1e-5, atol=1e-6)


def test_reverse_real_keeps_padding_in_place():
    x = torch.arange(6.0).view(1, 6)
    assert reverse_real(x, torch.tensor([[False, False, True, True, True, True]])).tolist() == [[0, 1, 5, 4, 3, 2]]
    assert reverse_real(x, torch.tensor([[True, True, True, False, True, False]])).tolist() == [[4, 2, 1, 3, 0, 5]]


# -- the scalar mix --

def test_scalar_mix_by_hand():
    layers = [torch.randn(2, 3, 4) for _ in range(3)]
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
        mix.gamma.fill_(1.5)
    e = [math.exp(w) for w in (0.5, -1.0, 2.0)]
    expected = 1.5 * sum(w / sum(e) * h for w, h in zip(e, layers))
    torch.testing.assert_close(mix(layers), expected)
    torch.testing.assert_close(ScalarMix(3)(layers), sum(layers) / 3)   # at the start: the mean


@torch.no_grad()
def test_layers_are_token_duplicated_then_forward_backward():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 5, 2]])
    x, forward, backward = model.directions(model.char_table[ids])
    layers = model.layers(model.char_table[ids])
    assert [tuple(h.shape) for h in layers] == [(1, 4, 12)] * 3
    torch.testing.assert_close(layers[0], torch.cat([x, x], -1))
    for j in (1, 2):
        torch.testing.assert_close(layers[j], torch.cat([forward[j - 1], backward[j - 1]], -1))



def test_neighbours_rank_by_cosine_about_the_mean():
    model = tiny_bilm()
    sentences = [["the", "river", "bank"], ["money", "bank"], ["ran", "the", "café", "zebra"]]   # zebra: no id
    found = contextual_neighbours(model, ["the", "bank", "ran"], "bank", sentences, top=9, layer=2)
    vectors = torch.cat(contextual_vectors(model, sentences, 2))
    query = contextual_vectors(model, [["the", "bank", "ran"]], 2)[0][1]
    mean = vectors.mean(0)
    by_hand = [F.cosine_similarity(v - mean, query - mean, dim=0).item() for v in vectors]
    where = [(n, i) for n, s in enumerate(sentences) for i in range(len(s))]
    assert len(found) == 9
    assert [c for _, c, _, _ in found] == pytest.approx(sorted(by_hand, reverse=True), abs=1e-5)
    for word, cosine, sentence, i in found:
        assert sentence[i] == word and by_hand[where.index((sentences.index(sentence), i))] == pytest.approx(cosine)


# -- the model protocol --

@torch.no_grad()
def test_forward_direction_generates_incrementally():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 5, 4, 6]])
    full = model(ids)
    _, forward, _ = model.directions(model.char_table[ids])
    torch.testing.assert_close(full, model.lm_head(forward[-1]))
    cache = model.new_cache(1, 8)
    steps = torch.cat([model(ids[:, :2], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(2, 5)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)
    assert cache.batch == 1
    cache.select_rows(torch.tensor([0, 0]))
    assert cache.batch == 2


@torch.no_grad()
def test_left_padded_prompts_match_alone():
    model = tiny_bilm()
    batch = torch.tensor([[0, 0, 1, 3], [1, 6, 5, 4]])
    pad = torch.tensor([[False, False, True, True], [True] * 4])
    cache = model.new_cache(2, 8)
    last = model(batch, cache=cache, pad_mask=pad, last_only=True)[:, -1]
    torch.testing.assert_close(last[0], model(batch[:1, 2:])[0, -1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last[1], model(batch[1:])[0, -1], rtol=1e-5, atol=1e-6)
    following = model(torch.tensor([[5], [2]]), cache=cache)[:, -1]
    torch.testing.assert_close(following[0], model(torch.tensor([[1, 3, 5]]))[0, -1], rtol=1e-5, atol=1e-6)


def test_tokenizer_cuts_text_as_word2vec_does():
    vocab = [*SPECIALS, "hello", "don't", "café", "école", "foo’bar", "x", "b"]
    tok = word_tokenizer(vocab)
    text = "Hello, DON'T 42 café_x! foo’bar über ÉCOLE a1b"
    ids = tok.encode(text)
    expected = [vocab.index(w) if w in vocab else 0 for w in words(text)]
    assert ids == expected
    assert tok.decode(ids) == "hello don't café x foo’bar école b"
    assert tok.encode_chat([{"role": "user", "content": "Hello"}]) == [1, 3, 2, 1]   # <s> hello </s> <s>
    assert tok.eos_token_id == 2


# -- training, on a planted corpus where "bank" has two senses --

RIVER = ["river", "water", "boat", "fish", "shore", "stream", "muddy", "swim"]
MONEY = ["money", "loan", "cash", "account", "deposit", "teller", "savings", "interest"]
FILL = ["the", "a", "by", "at", "near", "with"]
RIVER_SENTENCE = "fish water the bank near shore muddy"
MONEY_SENTENCE = "cash loan a bank by account teller"


def bank_corpus(path: Path, n: int = 1500, seed: int = 0) -> Path:
    """Two topic words, a filler, "bank", a filler, two more of the same topic: the river or the money pool."""
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        t = r.sample(r.choice([RIVER, MONEY]), 4)
        lines.append(" ".join([*t[:2], r.choice(FILL), "bank", r.choice(FILL), *t[2:]]))
    path.write_text("\n".join(lines) + "\n")
    return path


TINY = {"projection_dim": 16, "hidden_size": 32, "filters": "1:8,2:8,3:16", "char_dim": 8, "max_characters": 12,
        "batch_size": 16, "lr": 0.01, "eval_every": 10**6}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(directory, corpus, LM): a biLM trained for 300 steps on bank_corpus (about 10 s on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("elmo")
    corpus = bank_corpus(root / "bank.txt")
    lm = train_elmo(ElmoConfig(out=str(root / "model"), data=str(corpus), max_steps=300, device="cpu", **TINY),
                    quiet=True)
    lm.save(root / "model")
    torch.set_num_threads(before)
    return root / "model", corpus, lm


def sense_vectors(model, corpus: Path, layer=None) -> dict[str, torch.Tensor]:
    """The mean vector of "bank" over the corpus's river sentences and over its money sentences."""
    sentences = [words(line) for line in corpus.read_text().splitlines()[:300]]
    vectors = contextual_vectors(model, sentences, layer)
    senses = {"river": [], "money": []}
    for s, v in zip(sentences, vectors):
        senses["river" if set(s) & set(RIVER) else "money"].append(v[s.index("bank")])
    return {k: torch.stack(v).mean(0) for k, v in senses.items()}


def test_elmo_tells_the_senses_apart_where_word2vec_cannot(trained, tmp_path):
    _, corpus, lm = trained
    senses = sense_vectors(lm.model, corpus, layer=2)
    river, money = (contextual_vectors(lm.model, [words(s)], layer=2)[0][3] for s in (RIVER_SENTENCE, MONEY_SENTENCE))
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0).item()
    assert cos(river, senses["river"]) > cos(river, senses["money"]) + 0.02
    assert cos(money, senses["money"]) > cos(money, senses["river"]) + 0.02
    assert cos(river, money) < 0.99                         # one word, two vectors
    # layer 0 is the token vector alone: the same in both sentences
    zero = [contextual_vectors(lm.model, [words(s)], layer=0)[0][3] for s in (RIVER_SENTENCE, MONEY_SENTENCE)]
    torch.testing.assert_close(zero[0], zero[1])
    # word2vec on the same corpus: "bank" has one vector, and it sits between the two senses, its
    # nearest words drawn from both pools
    w2v = train_word2vec(Word2VecConfig(out="unused", data=str(corpus), dim=16, window=3, sample=0, min_count=1,
                                        epochs=5, batch_size=256, lr=0.025), quiet=True)
    near = {w for w, _ in w2v.similar("bank", 8)}
    assert near & set(RIVER) and near & set(MONEY), near


def test_similar_in_context_finds_the_same_sense(trained, tmp_path, monkeypatch):
    model, _, _ = trained
    for sentence, pool in ((RIVER_SENTENCE, RIVER), (MONEY_SENTENCE, MONEY)):
        run = run_cli("similar", "Bank", "--context", sentence, "--model", model, "--top", "5", "--max-sentences",
                      "300", "--device", "cpu", home=tmp_path, monkeypatch=monkeypatch)
        assert run.rc == 0, run.err
        lines = run.out.splitlines()
        assert len(lines) == 5
        for line in lines:
            word, cosine, shown = line.split("\t")
            assert word == "bank" and "[bank]" in shown and -1 <= float(cosine) <= 1
            assert set(shown.split()) & set(pool), line        # a bank of the same sense
    # the mix of all layers runs too, as does the token layer (where every bank is the same vector)
    run = run_cli("similar", "bank", "--context", RIVER_SENTENCE, "--model", model, "--layer", "0", "--top", "3",
                  "--max-sentences", "50", home=tmp_path, monkeypatch=monkeypatch)
    assert [float(line.split("\t")[1]) for line in run.out.splitlines()] == pytest.approx([1.0] * 3)
    run = run_cli("similar", "bank", "--context", RIVER_SENTENCE, "--model", model, "--layer", "mix", "--top", "3",
                  "--max-sentences", "50", home=tmp_path, monkeypatch=monkeypatch)
    assert run.rc == 0 and len(run.out.splitlines()) == 3, run.err


# -- the model directory --

@torch.no_grad()
def test_save_load_round_trip(trained):
    path, _, lm = trained
    loaded = engine.load(path, device="cpu", dtype="float32")
    assert type(loaded.model) is BiLM and loaded.config["model_type"] == "parley_elmo"
    ids = torch.tensor([lm.tokenizer.encode("fish water the bank near shore")])
    torch.testing.assert_close(loaded.model(ids), lm.model(ids))
    for a, b in zip(loaded.model.layers(lm.model.char_table[ids]), lm.model.layers(lm.model.char_table[ids])):
        torch.testing.assert_close(a, b)
    assert torch.equal(loaded.model.char_table, lm.model.char_table)
    assert loaded.tokenizer.encode(RIVER_SENTENCE) == lm.tokenizer.encode(RIVER_SENTENCE)
    assert loaded.eos_token_ids == [2]


@torch.no_grad()
def test_eval_scores_the_forward_lm(trained, tmp_path, monkeypatch):
    path, corpus, lm = trained
    text = tmp_path / "one.txt"
    text.write_text(RIVER_SENTENCE + "\n")
    ids = torch.tensor([[1, *lm.tokenizer.encode(RIVER_SENTENCE), 2]])      # <s> words </s>
    expected = lm.model.losses(ids)[0].item()
    result = evaluate(lm, [RIVER_SENTENCE])
    assert result["tokens"] == ids.shape[1] - 1
    assert result["loss_per_token"] == pytest.approx(expected, rel=1e-5)
    run = run_cli("eval", "--model", path, "--data", corpus, "--json", "--max-examples", "20", home=tmp_path,
                  monkeypatch=monkeypatch)
    assert run.rc == 0, run.err
    row = json.loads(run.out)
    assert row["family"] == "ELMo biLM x2 (forward)" and row["ppl_per_token"] < 8   # 26 words, topics planted


def test_generates_through_the_cli(trained, tmp_path, monkeypatch):
    path, _, _ = trained
    run = run_cli("generate", "--model", path, "--prompt", "fish water", "--max-new-tokens", "4", "--seed", "1",
                  home=tmp_path, monkeypatch=monkeypatch)
    assert run.rc == 0, run.err
    assert run.out.strip() and all(w in RIVER + MONEY + FILL + ["bank"] for w in run.out.split())


# -- bad input --

def test_bad_input_is_one_line(trained, tmp_path, monkeypatch):
    path, corpus, _ = trained

    def refused(*argv, words):
        assert_one_line_error(run_cli(*argv, home=tmp_path, monkeypatch=monkeypatch), *words)

    refused("similar", "bank", "--model", path, words=["ELMo model", "--context"])
    refused("similar", "bank", "--context", "the fish swam", "--model", path, words=["'bank'", "not a word of"])
    refused("similar", "bank", "--context", RIVER_SENTENCE, "--model", path, "--layer", "7",
            words=["--layer", "out of range"])
    refused("similar", "bank", "--context", RIVER_SENTENCE, "--model", path, "--max-sentences", "0",
            words=["--max-sentences 0"])
    refused("similar", "two words", "--context", RIVER_SENTENCE, "--model", path, words=["not one word"])
    refused("similar", "bank", "--context", RIVER_SENTENCE, "--model", tmp_path, words=["--context", "ELMo model"])
    refused("train", "elmo", "--data", corpus, "--out", tmp_path / "o", "--filters", "3x8", words=["--filters", "width:count"])
    refused("train", "elmo", "--data", corpus, "--out", tmp_path / "o", "--filters", "9:8", "--max-characters", "6",
            words=["max_characters 6", "widest filter"])
    refused("train", "elmo", "--data", corpus, "--out", tmp_path / "o", "--min-count", "100000",
            words=["--min-count 100000"])
    refused("train", "elmo", "--data", corpus, "--out", tmp_path / "o", "--max-len", "1", words=["--max-len 1"])
    assert not (tmp_path / "o").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    config = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**config, "filters": [[3, "x"]]}))
    refused("similar", "bank", "--context", RIVER_SENTENCE, "--model", damaged, words=["filters", "[width, count]"])
    (damaged / "config.json").write_text(json.dumps(config))
    tensors = safetensors.torch.load_file(damaged / "model.safetensors")
    del tensors["char_table"]
    safetensors.torch.save_file(tensors, damaged / "model.safetensors")
    refused("eval", "--model", damaged, "--data", corpus, words=["char_table"])


def test_train_through_the_cli(tmp_path, monkeypatch):
    corpus = bank_corpus(tmp_path / "bank.txt", n=200)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    run = run_cli("train", "elmo", "--data", corpus, "--out", tmp_path / "m", "--max-steps", "3", "--device", "cpu",
                  *flags, home=tmp_path, monkeypatch=monkeypatch)
    assert run.rc == 0, run.err
    assert "wrote" in run.err and "held-out perplexity forward" in run.err
    lm = engine.load(tmp_path / "m", device="cpu")
    assert lm.config["data"] == str(corpus.resolve()) and lm.config["filters"] == [[1, 8], [2, 8], [3, 16]]


def test_rows_cut_long_sentences_and_keep_rare_words_characters():
    vocab = [*SPECIALS, "a", "b"]
    rows = Rows([["a", "b", "a", "zebra", "a", "b", "a"], ["b"]], vocab, max_len=4, max_characters=8)
    # <s> + 7 words + </s> in rows of 4 that overlap by one: each pair of neighbours in exactly one row
    ids, chars, mask = rows.batch([0, 1, 2, 3], "cpu")
    assert ids.tolist() == [[1, 3, 4, 3], [3, 0, 3, 4], [4, 3, 2, 0], [1, 4, 2, 0]]   # zebra: <unk> as a target ...
    assert chars[1, 1].tolist() == characters("zebra", 8)           # ... but its own characters as input
    assert chars[2, 2].tolist() == characters("</s>", 8)
    assert mask.tolist() == [[True] * 4, [True] * 4, [True] * 3 + [False], [True] * 3 + [False]]
