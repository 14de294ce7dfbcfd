"""word2vec: the objective by hand, the Huffman tree, the windows, planted neighbours and analogies,
and the text format against gensim."""
import heapq
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_input import assert_one_line_error, run_cli
from helpers import torch_threads

from engine.errors import ParleyError
from engine.models.word2vec import (
    Word2Vec,
    hierarchical_softmax_loss,
    huffman,
    keep_probability,
    negative_sampling_loss,
    words,
)
from engine.train.config import Word2VecConfig
from engine.train.word2vec import (
    encode,
    epoch_examples,
    sentences_of,
    sgd_step,
    train_word2vec,
    vocabulary,
)

COMBOS = [("skipgram", "negative"), ("skipgram", "hierarchical"), ("cbow", "negative"), ("cbow", "hierarchical")]
LETTERS = "abcdefghijkl"   # names without digits: digits are not part of words


@pytest.fixture(autouse=True)
def one_thread():
    """The batches are tiny: threads only wait on each other (and on the other tests' processes)."""
    with torch_threads(1):
        yield


def neighbours_corpus(path: Path, topics: int = 6, n: int = 1500, seed: int = 0) -> Path:
    """Each line: four context words of one topic around that topic's alpha or beta word. alpha and
    beta of a topic never meet but share every context, so each must be the other's nearest word."""
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        t = r.randrange(topics)
        context = r.sample([f"ctx{LETTERS[t]}{LETTERS[i]}" for i in range(6)], 4)
        lines.append(" ".join(context[:2] + [r.choice(["alpha", "beta"]) + LETTERS[t]] + context[2:]))
    path.write_text("\n".join(lines) + "\n")
    return path


def analogy_corpus(path: Path, roles: int = 6, n: int = 3000, seed: int = 0) -> Path:
    """word{g}{k} is a gender g (m or f) and a role k: two words of gender g's context pool, the word,
    two of role k's. So word{g}{k} ~ gender g + role k, and wordma : wordfa :: wordmb : wordfb."""
    r = random.Random(seed)
    gender = {g: [f"gen{g}{LETTERS[i]}" for i in range(5)] for g in "mf"}
    role = {k: [f"role{LETTERS[k]}{LETTERS[i]}" for i in range(5)] for k in range(roles)}
    lines = []
    for _ in range(n):
        g, k = r.choice("mf"), r.randrange(roles)
        lines.append(" ".join(r.sample(gender[g], 2) + [f"word{g}{LETTERS[k]}"] + r.sample(role[k], 2)))
    path.write_text("\n".join(lines) + "\n")
    return path


def train(data: Path, architecture="skipgram", loss="negative", **kw) -> Word2Vec:
    # lr 0.025 for both architectures (gensim's default): CBOW's 0.05 is word2vec.c's for large
    # vocabularies, and on 50 words it leaves CBOW with hierarchical softmax missing some analogies
    settings = {"lr": 0.025, "dim": 16, "window": 2, "sample": 0, "min_count": 1, "epochs": 5, "batch_size": 256} | kw
    return train_word2vec(Word2VecConfig(out="unused", data=str(data), architecture=architecture, loss=loss,
                                         **settings), quiet=True)


# -- text into words, and the counts --

def test_words_are_lower_cased_letters():
    assert words("Don't STOP: it's 42 o'clock, café-au-lait!") == ["don't", "stop", "it's", "o'clock", "café", "au",
                                                                  "lait"]


def test_sentences_are_lines_or_messages():
    conversation = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "42"},
                    {"role": "assistant", "content": "Hello, you."}]
    assert sentences_of(["One line.", conversation]) == [["one", "line"], ["hi", "there"], ["hello", "you"]]


def test_vocabulary_most_frequent_first_with_min_count():
    vocab, counts = vocabulary([["b", "a", "c"], ["a", "b", "d"], ["a"]], min_count=2)
    assert (vocab, counts) == (["a", "b"], [3, 2])
    with pytest.raises(ParleyError, match="--min-count"):
        vocabulary([["a", "b"]], min_count=2)


def test_keep_probability_by_hand():
    # frequencies 0.9, 0.09, 0.01 at threshold 0.01: (sqrt(f / s) + 1) s / f, at most 1
    p = keep_probability(np.array([90.0, 9.0, 1.0]), 0.01)
    assert p == pytest.approx([(math.sqrt(90) + 1) / 90, (3 + 1) / 9, 1.0])
    assert keep_probability(np.array([90.0, 10.0]), 0).tolist() == [1.0, 1.0]


# -- the objective --

def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_negative_sampling_loss_by_hand():
    h = torch.tensor([[1.0, 0.5]])
    positive = torch.tensor([[2.0, 0.0]])                    # u_o . h = 2
    negatives = torch.tensor([[[0.0, 2.0], [-1.0, 0.0]]])     # u_k . h = 1 and -1
    loss = negative_sampling_loss(h, positive, negatives)
    assert loss.item() == pytest.approx(-(log_sigmoid(2) + log_sigmoid(-1) + log_sigmoid(1)))
    masked = negative_sampling_loss(h, positive, negatives, torch.tensor([[1.0, 0.0]]))
    assert masked.item() == pytest.approx(-(log_sigmoid(2) + log_sigmoid(-1)))


def test_hierarchical_softmax_loss_by_hand():
    h = torch.tensor([[1.0, -1.0]])
    nodes = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])   # scores 1, -2, 0 (the last is padding)
    codes, mask = torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    # bit 0 takes sigma(x), bit 1 sigma(-x)
    assert hierarchical_softmax_loss(h, nodes, codes, mask).item() == pytest.approx(-(log_sigmoid(1) + log_sigmoid(2)))


def test_hierarchical_softmax_is_a_distribution_over_the_words():
    counts = [50, 20, 9, 9, 6, 3, 2, 1]
    model = Word2Vec([f"w{LETTERS[i]}" for i in range(8)], counts, dim=4, loss="hierarchical")
    torch.nn.init.normal_(model.output.weight)
    h = torch.randn(1, 4).expand(8, 4)
    every = torch.arange(8)
    loss = hierarchical_softmax_loss(h, model.output(model.points[every]), model.codes[every], model.path_mask[every])
    assert torch.exp(-loss).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_cbow_input_is_the_mean_of_the_window_s_words():
    model = Word2Vec(["a", "b", "c", "d"], [4, 3, 2, 1], dim=3, architecture="cbow")
    v = model.input.weight.detach()
    h = model.hidden(torch.tensor([[1, 2, 0], [3, 0, 0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(h, torch.stack([(v[1] + v[2]) / 2, v[3]]))


def test_huffman_codes_by_hand():
    # word2vec.c's tree for counts 5 3 2 1: (2, 1) join as inner node 0 (sum 3, 2 on the 1 branch);
    # then that node (3, taken before the leaf 3 on a tie) and 3 as node 1, word 3 on the 1 branch;
    # then 5 and node 1 at the root, node 2
    codes, points = huffman([5, 3, 2, 1])
    assert codes == [[0], [1, 1], [1, 0, 1], [1, 0, 0]]
    assert points == [[2], [2, 1], [2, 1, 0], [2, 1, 0]]


def test_huffman_codes_are_optimal_and_prefix_free():
    r = random.Random(0)
    for _ in range(20):
        counts = sorted((r.randint(1, 1000) for _ in range(r.randint(2, 40))), reverse=True)
        codes, points = huffman(counts)
        heap = list(counts)   # the optimal cost, by the textbook algorithm: the sum of every merge
        heapq.heapify(heap)
        cost = 0
        while len(heap) > 1:
            merged = heapq.heappop(heap) + heapq.heappop(heap)
            cost += merged
            heapq.heappush(heap, merged)
        assert sum(c * len(code) for c, code in zip(counts, codes)) == cost
        strings = ["".join(map(str, code)) for code in codes]
        assert not any(a != b and b.startswith(a) for a in strings for b in strings)
        assert all(p[0] == len(counts) - 2 and max(p) <= len(counts) - 2 for p in points)


def test_sgd_step_sums_each_row_s_gradients_with_its_rate_capped():
    model = Word2Vec(["a", "b", "c"], [3, 2, 1], dim=2)
    before = model.input.weight.detach().clone()
    # row 0 looked up three times with gradient (1, 1) and once as padding (gradient 0), row 1 once
    # with (2, 0), row 2 only as padding
    weights = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    (model.input(torch.tensor([0, 0, 0, 0, 1, 2])) * weights).sum().backward()
    sgd_step(model, 0.1)   # 0.1 x 3 uses < 1: plain SGD on the summed gradients
    torch.testing.assert_close(before - model.input.weight.detach(), torch.tensor([[0.3, 0.3], [0.2, 0.0], [0, 0]]))
    before = model.input.weight.detach().clone()
    (model.input(torch.tensor([0, 0, 0, 0, 1, 2])) * weights).sum().backward()
    sgd_step(model, 0.5)   # row 0: 0.5 x 3 uses > 1, so its rate is 1 / 3: it moves one mean gradient
    torch.testing.assert_close(before - model.input.weight.detach(), torch.tensor([[1.0, 1.0], [1.0, 0.0], [0, 0]]))
    assert model.input.weight.grad is None


def test_huffman_codes_and_keep_probabilities_match_gensim():
    # distinct counts: on ties gensim's heap and word2vec.c's two queues may pick different nodes
    from gensim.models import Word2Vec as GensimWord2Vec
    r = random.Random(0)
    counts = sorted(r.sample(range(1, 400), 30), reverse=True)
    names = [f"w{LETTERS[i // 12]}{LETTERS[i % 12]}" for i in range(30)]
    reference = GensimWord2Vec(vector_size=4, min_count=1, sample=0.01, hs=1, negative=0, workers=1)
    reference.build_vocab([[name] * c for name, c in zip(names, counts)])
    kv = reference.wv
    assert list(kv.index_to_key) == names
    codes, points = huffman(counts)
    assert codes == [kv.get_vecattr(name, "code").tolist() for name in names]
    assert points == [kv.get_vecattr(name, "point").tolist() for name in names]
    kept = np.array([kv.get_vecattr(name, "sample_int") for name in names]) / 2**32   # gensim keeps p x 2^32
    np.testing.assert_allclose(keep_probability(np.array(counts, dtype=float), 0.01), kept, atol=1e-9)


# -- windows and sub-sampling --

def test_pairs_stay_inside_windows_and_sentences():
    ids, sentence = encode([["a", "b", "c"], ["d", "e"]], {w: i for i, w in enumerate("abcde")})
    keep, g = torch.ones(5), torch.Generator().manual_seed(0)
    context, target, mask = epoch_examples(ids, sentence, keep, 1, False, g)
    assert mask is None
    assert sorted(zip(context.tolist(), target.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (3, 4), (4, 3)]
    context, target, mask = epoch_examples(ids, sentence, keep, 1, True, g)
    rows = {t: sorted(c for c, m in zip(cs, ms) if m) for cs, t, ms in zip(context.tolist(), target.tolist(),
                                                                           mask.tolist())}
    assert rows == {0: [1], 1: [0, 2], 2: [1], 3: [4], 4: [3]}


def test_window_sizes_are_drawn_per_centre_word():
    # word2vec.c draws each centre word's window in 1 … window: distance d is used with chance (window - d + 1) / window
    ids, sentence = torch.arange(20000) % 7, torch.zeros(20000, dtype=torch.long)
    context, target, _ = epoch_examples(ids, sentence, torch.ones(7), 3, False, torch.Generator().manual_seed(0))
    distance = ((context - target) % 7).tolist()
    shares = [sum(d in (k, 7 - k) for d in distance) / (2 * 20000) for k in (1, 2, 3)]
    assert shares == pytest.approx([1, 2 / 3, 1 / 3], abs=0.01)


def test_sub_sampling_drops_words_before_the_windows():
    ids, sentence = torch.tensor([0, 1, 0, 2, 0, 1]), torch.zeros(6, dtype=torch.long)
    keep = torch.tensor([0.0, 1.0, 1.0])   # word 0 always dropped: 1 and 2 become neighbours
    context, target, _ = epoch_examples(ids, sentence, keep, 1, False, torch.Generator().manual_seed(0))
    assert sorted(zip(context.tolist(), target.tolist())) == [(1, 2), (1, 2), (2, 1), (2, 1)]


# -- what training learns --

@pytest.mark.parametrize("architecture,loss", COMBOS)
def test_planted_neighbours_come_out_nearest(tmp_path, architecture, loss):
    model = train(neighbours_corpus(tmp_path / "corpus.txt"), architecture, loss)
    for t in LETTERS[:6]:
        assert model.similar("alpha" + t, 1)[0][0] == "beta" + t, model.similar("alpha" + t, 3)
        assert model.similar("beta" + t, 1)[0][0] == "alpha" + t, model.similar("beta" + t, 3)


@pytest.mark.parametrize("architecture,loss", COMBOS)
def test_planted_analogy_is_solved(tmp_path, architecture, loss):
    model = train(analogy_corpus(tmp_path / "corpus.txt"), architecture, loss)
    for a, b in [("a", "b"), ("c", "d"), ("e", "a"), ("f", "c")]:
        answer = model.analogy(f"wordm{a}", f"wordf{a}", f"wordm{b}", 3)
        assert answer[0][0] == f"wordf{b}", answer
        assert not {f"wordm{a}", f"wordf{a}", f"wordm{b}"} & {w for w, _ in answer}


def bpe_for(corpus: Path, out: Path) -> Path:
    """A byte-level BPE trained on `corpus` (engine/train/tokenizer.py), large enough that every planted
    word is one token of it, its leading space included (Ġalphaa); saved in `out`."""
    from engine.train.tokenizer import train_tokenizer
    train_tokenizer(corpus.read_text().splitlines(), 600).save(out)
    return out


def test_over_a_tokenizer_s_tokens_the_planted_neighbours_come_out_nearest(tmp_path):
    """--tokenizer: the units are a BPE's tokens by their names ("Ġbetaa"); a word the tokenizer keeps
    whole is looked up as its token, results show as text, and the model saves and loads with it."""
    from engine.tokenizer import Tokenizer
    corpus = neighbours_corpus(tmp_path / "corpus.txt")
    tok = bpe_for(corpus, tmp_path / "bpe")
    bpe = Tokenizer.from_dir(tok)
    assert sentences_of(["ctxaa alphaa ctxab"], bpe) == [["ctxaa", "Ġalphaa", "Ġctxab"]]
    model = train(corpus, tokenizer=str(tok))
    assert "Ġalphaa" in model.words and "alphaa" not in model.index   # no planted word starts a line
    for t in LETTERS[:6]:
        best = model.similar("alpha" + t, 1)[0][0]
        assert best == "Ġbeta" + t and model.shown(best) == "beta" + t, model.similar("alpha" + t, 3)
    assert model.lookup("Ġbetab") == model.lookup("betab")
    with pytest.raises(ParleyError, match="several tokens"):
        model.lookup("alphaabeta")
    model.save(tmp_path / "model")
    loaded = Word2Vec.load(tmp_path / "model")
    assert loaded.words == model.words and loaded.similar("alphac", 1) == model.similar("alphac", 1)
    from gensim.models import KeyedVectors   # token names hold no whitespace: the text format keeps them
    kv = KeyedVectors.load_word2vec_format(str(tmp_path / "model" / "vectors.txt"), binary=False)
    assert list(kv.index_to_key) == model.words


def test_sub_sampling_still_finds_the_neighbours(tmp_path):
    # every word of this small vocabulary is frequent: a threshold of 0.01 drops about half of them
    model = train(neighbours_corpus(tmp_path / "corpus.txt", n=3000), sample=0.01, epochs=8)
    assert all(model.similar("alpha" + t, 1)[0][0] == "beta" + t for t in LETTERS[:6])


def test_training_is_a_function_of_the_seed(tmp_path):
    data = neighbours_corpus(tmp_path / "corpus.txt", n=300)
    one, two, other = train(data, epochs=1), train(data, epochs=1), train(data, epochs=1, seed=1)
    assert torch.equal(one.vectors(), two.vectors())
    assert not torch.equal(one.vectors(), other.vectors())


# -- files, gensim and the command line --

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model trained with `parley train word2vec` on the analogy corpus, and its directory."""
    root = tmp_path_factory.mktemp("w2v")
    data, out = analogy_corpus(root / "corpus.txt"), root / "model"
    from engine.cli import main
    home = root / "home"
    # set up before the function fixtures: one_thread is not yet on
    with torch_threads(1), pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARLEY_HOME", str(home))
        assert main(["train", "word2vec", "--data", str(data), "--out", str(out), "--dim", "16", "--window", "2",
                     "--sample", "0", "--min-count", "1", "--architecture", "cbow"]) == 0
    assert not home.exists()   # like ngram's, a word2vec run is not recorded in the store
    return out


def test_saved_model_loads_as_trained(saved):
    model = Word2Vec.load(saved)
    assert (model.architecture, model.loss, model.dim) == ("cbow", "negative", 16)
    assert model.analogy("wordma", "wordfa", "wordmb", 1)[0][0] == "wordfb"


@pytest.mark.parametrize("architecture,loss", COMBOS)
def test_save_and_load_give_back_both_tables(tmp_path, architecture, loss):
    model = train(neighbours_corpus(tmp_path / "corpus.txt", n=300), architecture, loss, epochs=1)
    model.save(tmp_path / "model")
    loaded = Word2Vec.load(tmp_path / "model")
    assert (loaded.words, loaded.counts.tolist()) == (model.words, model.counts.tolist())
    assert (loaded.architecture, loaded.loss, loaded.window) == (architecture, loss, 2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_gensim_reads_the_text_format_as_the_same_vectors(saved):
    from gensim.models import KeyedVectors
    model = Word2Vec.load(saved)
    kv = KeyedVectors.load_word2vec_format(str(saved / "vectors.txt"), binary=False)
    assert list(kv.index_to_key) == model.words
    np.testing.assert_allclose(kv.vectors, model.vectors().numpy(), rtol=0, atol=0)
    # gensim's most_similar is the reference for the cosine ranking and 3CosAdd
    ours, theirs = model.similar("wordma", 5), kv.most_similar("wordma", topn=5)
    assert [w for w, _ in ours] == [w for w, _ in theirs]
    np.testing.assert_allclose([c for _, c in ours], [c for _, c in theirs], atol=1e-5)
    ours, theirs = model.analogy("wordma", "wordfa", "wordmc", 5), kv.most_similar(["wordfa", "wordmc"], ["wordma"], 5)
    assert [w for w, _ in ours] == [w for w, _ in theirs]
    np.testing.assert_allclose([c for _, c in ours], [c for _, c in theirs], atol=1e-5)


def test_gensim_trained_on_the_planted_corpus_agrees(tmp_path):
    from gensim.models import Word2Vec as GensimWord2Vec
    data = neighbours_corpus(tmp_path / "corpus.txt")
    ours = train(data)
    sentences = [line.split() for line in data.read_text().splitlines()]
    theirs = GensimWord2Vec(sentences, vector_size=16, window=2, min_count=1, sample=0, sg=1, negative=5, epochs=5,
                            seed=0, workers=1).wv
    for t in LETTERS[:6]:
        assert ours.similar("alpha" + t, 1)[0][0] == theirs.most_similar("alpha" + t, topn=1)[0][0] == "beta" + t


def test_similar_and_analogy_commands(saved, tmp_path, monkeypatch):
    run = run_cli("similar", "WordMA", "--model", saved, "--top", "3", home=tmp_path, monkeypatch=monkeypatch)
    assert run.rc == 0 and len(run.out.splitlines()) == 3
    assert [line.split("\t")[0] for line in run.out.splitlines()] == [w for w, _ in
                                                                     Word2Vec.load(saved).similar("wordma", 3)]
    run = run_cli("analogy", "wordma", "wordfa", "wordmb", "--model", saved, "--top", "2", home=tmp_path,
                  monkeypatch=monkeypatch)
    assert run.rc == 0 and run.out.splitlines()[0].split("\t")[0] == "wordfb"


def test_bad_input_is_one_line(saved, tmp_path, monkeypatch):
    def refused(*argv, words):
        assert_one_line_error(run_cli(*argv, home=tmp_path, monkeypatch=monkeypatch), *words)

    refused("similar", "zebra", "--model", saved, words=["'zebra'", "not in the vocabulary", "--min-count"])
    refused("analogy", "wordma", "wordfa", "zebra", "--model", saved, words=["'zebra'", "not in the vocabulary"])
    refused("similar", "wordma", "--model", tmp_path, words=["no config.json", "not a word2vec model",
                                                             "parley train word2vec"])
    refused("similar", "wordma", "--model", tmp_path / "nowhere", words=["not a directory"])
    refused("similar", "wordma", "--model", saved, "--top", "0", words=["--top 0", "1 or more"])
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    refused("similar", "wordma", "--model", tmp_path / "llama", words=["'llama'", "not a word2vec model"])
    damaged = tmp_path / "damaged"
    shutil.copytree(saved, damaged)
    (damaged / "vocab.json").write_text('{"words": ["a"], "counts": [1]}')
    refused("similar", "wordma", "--model", damaged, words=["vocab.json", "vocab_size"])
    refused("train", "word2vec", "--data", saved.parent / "corpus.txt", "--out", tmp_path / "o", "--min-count",
            "100000", words=["--min-count 100000", "lower --min-count"])
    refused("train", "word2vec", "--data", saved.parent / "corpus.txt", "--out", tmp_path / "o", "--sample", "2",
            words=["--sample 2", "between 0 and 1"])


def test_batches_far_larger_than_the_vocabulary_do_not_diverge(tmp_path):
    # 2048 centre words over 48 words: each word is in a batch about 40 times as target and 200 times
    # as a negative; summed into one SGD step at lr 0.05 that diverges (engine/train/word2vec.py sgd_step)
    model = train(neighbours_corpus(tmp_path / "corpus.txt", n=3000), "cbow", lr=0.05, batch_size=2048, epochs=10)
    assert torch.isfinite(model.vectors()).all() and torch.isfinite(model.output.weight).all()
    assert all(model.similar("alpha" + t, 1)[0][0] == "beta" + t for t in LETTERS[:6])
