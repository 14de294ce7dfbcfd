"""word2vec (Mikolov et al. 2013): word vectors trained to predict a word's neighbours.

Two architectures over one table of input vectors (the word vectors kept at the end):
- skip-gram: each context word's vector predicts the centre word;
- CBOW: the mean of the context words' vectors predicts the centre word.
And two objectives over a second table of output vectors:
- negative sampling: the true word against k words drawn from the unigram distribution to the 3/4;
- hierarchical softmax: a walk down the Huffman tree of the counts, one binary decision per inner
  node, so frequent words have short codes.

A model directory holds config.json (model_type parley_word2vec), model.safetensors (`input.weight`,
`output.weight`), vocab.json (the words, most frequent first, and their counts) and vectors.txt, the
word2vec text format that gensim's `KeyedVectors.load_word2vec_format` reads. Trained over a
tokenizer's tokens instead of words (`parley train word2vec --tokenizer`: the units the language
models read), the "words" are its tokens by their names in its vocabulary, and the directory holds
its tokenizer.json too.
"""
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import (
    SINGLE,
    check_tensors,
    read_json,
    read_tensors,
    write_tensors,
)
from engine.errors import ParleyError
from engine.files import output_dir, write_json

MODEL_TYPE = "parley_word2vec"
ARCHITECTURES = ("skipgram", "cbow")
LOSSES = ("negative", "hierarchical")

# word2vec learns one vector per word type, so variants of one word should be one type: the text is
# lower-cased and cut at every character that is not a letter (an apostrophe inside a word stays,
# so "don't" is one word). Digits and punctuation carry no word of their own here, and no word can
# hold whitespace, which the text format separates fields with.
WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def tokens(tokenizer, text: str) -> list[str]:
    """`text` as a tokenizer's tokens, each by its name in the tokenizer's vocabulary (byte-level BPE's
    "Ġgood", SentencePiece's "▁good"), which holds no whitespace."""
    return [tokenizer.id_to_token(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def keep_probability(counts: np.ndarray, sample: float) -> np.ndarray:
    """The chance each occurrence of a word survives sub-sampling, as word2vec.c (and gensim) compute
    it: (sqrt(f / s) + 1) s / f for a word of frequency f (its share of all tokens) and threshold s,
    capped at 1. Mikolov et al.'s paper writes the drop chance as 1 - sqrt(s / f); the code adds s / f,
    which keeps a little more of the rare words. sample = 0 keeps everything."""
    if sample <= 0:
        return np.ones(len(counts))
    f = counts / counts.sum()
    return np.minimum(1.0, (np.sqrt(f / sample) + 1) * sample / f)


def huffman(counts) -> tuple[list[list[int]], list[list[int]]]:
    """(codes, points) per word of `counts` (sorted most frequent first), as word2vec.c builds them:
    the two least frequent nodes join under a new inner node, the second of them on the 1 branch.
    codes[w] are the bits from the root down to w; points[w] the inner nodes passed on the way
    (0 … V - 2, the root being V - 2), whose output vectors score each decision."""
    v = len(counts)
    if v < 2:
        raise ParleyError(f"hierarchical softmax needs a vocabulary of 2 or more words, not {v}: add data or "
                          "lower --min-count")
    count = [int(c) for c in counts] + [float("inf")] * (v - 1)
    parent, binary = [0] * (2 * v - 1), [0] * (2 * v - 1)
    leaf, inner = v - 1, v   # the next leaf (counts fall leftwards) and the next inner node (sums rise)
    for a in range(v - 1):
        pair = []
        for _ in range(2):
            if leaf >= 0 and count[leaf] < count[inner]:
                pair.append(leaf)
                leaf -= 1
            else:
                pair.append(inner)
                inner += 1
        count[v + a] = count[pair[0]] + count[pair[1]]
        parent[pair[0]] = parent[pair[1]] = v + a
        binary[pair[1]] = 1
    root = 2 * v - 2
    codes, points = [], []
    for w in range(v):
        code, point, node = [], [], w
        while node != root:
            code.append(binary[node])
            node = parent[node]
            point.append(node - v)
        codes.append(code[::-1])
        points.append(point[::-1])
    return codes, points


def negative_sampling_loss(h: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """-log σ(u_o·h) - Σ_k log σ(-u_k·h) per row: h [B, d], positive [B, d], negatives [B, k, d];
    mask [B, k] leaves out a negative that drew the true word (word2vec.c skips those)."""
    pos = F.logsigmoid((h * positive).sum(-1))
    neg = F.logsigmoid(-torch.einsum("bkd,bd->bk", negatives, h))
    if mask is not None:
        neg = neg * mask
    return -(pos + neg.sum(-1))


def hierarchical_softmax_loss(h: torch.Tensor, nodes: torch.Tensor, codes: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
    """-Σ_j log σ((1 - 2 code_j) u_j·h) per row over the path's inner nodes: h [B, d], nodes [B, L, d],
    codes and mask [B, L] (paths padded to the longest). Bit 0 is the σ(x) branch, as in word2vec.c."""
    x = torch.einsum("bld,bd->bl", nodes, h)
    return -(F.logsigmoid((1 - 2 * codes) * x) * mask).sum(-1)


class Word2Vec(nn.Module):
    """The two tables and the loss of a batch. `vocab` and `counts` are the words, most frequent first."""

    def __init__(self, vocab: list[str], counts, dim: int, architecture: str = "skipgram", loss: str = "negative",
                 window: int = 5, negative: int = 5, seed: int = 0, tokenizer=None):
        """`tokenizer` (engine.tokenizer.Tokenizer): the words are its tokens (see the module docstring)."""
        super().__init__()
        self.tokenizer = tokenizer
        if architecture not in ARCHITECTURES or loss not in LOSSES:
            raise ParleyError(f"word2vec: architecture {architecture!r} and loss {loss!r}: use one of "
                              f"{', '.join(ARCHITECTURES)} and one of {', '.join(LOSSES)}")
        self.words, self.counts = list(vocab), torch.tensor(np.asarray(counts, dtype=np.int64))
        self.index = {w: i for i, w in enumerate(self.words)}
        self.dim, self.architecture, self.loss, self.window, self.negative = dim, architecture, loss, window, negative
        v = len(self.words)
        g = torch.Generator().manual_seed(seed)
        # sparse: a batch touches a few rows, and SGD then updates only those (word2vec.c's update)
        self.input = nn.Embedding(v, dim, sparse=True)
        self.output = nn.Embedding(v - 1 if loss == "hierarchical" else v, dim, sparse=True)
        with torch.no_grad():   # word2vec.c's start: input uniform in ±0.5 / dim, output zero
            self.input.weight.copy_((torch.rand(v, dim, generator=g) - 0.5) / dim)
            self.output.weight.zero_()
        if loss == "hierarchical":
            codes, points = huffman(self.counts.tolist())
            longest = max(map(len, codes))
            pad = lambda rows: torch.tensor([r + [0] * (longest - len(r)) for r in rows])
            self.register_buffer("codes", pad(codes).float(), persistent=False)
            self.register_buffer("points", pad(points), persistent=False)
            self.register_buffer("path_mask", pad([[1] * len(c) for c in codes]).float(), persistent=False)
        else:
            noise = self.counts.double() ** 0.75
            self.register_buffer("noise", (noise / noise.sum()).float(), persistent=False)

    def hidden(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The input vector of each row: a word's (skip-gram, context [B]) or the mean of the masked
        context words' (CBOW, context and mask [B, C])."""
        if mask is None:
            return self.input(context)
        return (self.input(context) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)

    def forward(self, context: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The loss of predicting each `target` [B] from its context, per row."""
        h = self.hidden(context, mask)
        if self.loss == "hierarchical":
            return hierarchical_softmax_loss(h, self.output(self.points[target]), self.codes[target],
                                             self.path_mask[target])
        drawn = torch.multinomial(self.noise, target.numel() * self.negative, replacement=True, generator=generator)
        drawn = drawn.view(-1, self.negative).to(target.device)
        return negative_sampling_loss(h, self.output(target), self.output(drawn), (drawn != target[:, None]).float())

    # -- what the vectors are for --

    def vectors(self) -> torch.Tensor:
        return self.input.weight.detach()

    @property
    def units(self) -> str:
        """What its "words" are: "words", or a tokenizer's "tokens"."""
        return "words" if self.tokenizer is None else "tokens"

    def lookup(self, word: str) -> int:
        if self.tokenizer is not None:
            return self._lookup_token(word)
        i = self.index.get(word.lower())
        if i is None:
            raise ParleyError(f"{word!r} is not in the vocabulary ({len(self.words)} words, each seen at least "
                              "--min-count times in training): try another word, or retrain with a lower --min-count")
        return i

    def _lookup_token(self, word: str) -> int:
        """A token by its name, or a word the tokenizer keeps whole: inside a sentence (after a space),
        as most words are met, else at the start of a text."""
        if word in self.index:
            return self.index[word]
        found = [tokens(self.tokenizer, form) for form in (" " + word, word)]
        for units in found:
            if len(units) == 1 and units[0] in self.index:
                return self.index[units[0]]
        if all(len(units) == 1 for units in found):
            raise ParleyError(f"{word!r} is a token seen fewer than --min-count times in training: try another, "
                              "or retrain with a lower --min-count")
        raise ParleyError(f"{word!r} is several tokens of this model's tokenizer ({' '.join(found[0])}), and word2vec "
                          "over tokens has a vector per token: give one of them, or a word it keeps whole")

    def shown(self, word: str) -> str:
        """A word as a person reads it: a token's own text without its leading space (its name in the
        vocabulary where that text is blank), else the word."""
        if self.tokenizer is None:
            return word
        return self.tokenizer.decode([self.tokenizer.token_id(word)], skip_special_tokens=False).strip() or word

    def nearest(self, query: torch.Tensor, exclude: list[int], top: int) -> list[tuple[str, float]]:
        """The `top` words whose vectors have the largest cosine with `query`, leaving out `exclude`."""
        unit = F.normalize(self.vectors(), dim=-1)
        cosine = unit @ F.normalize(query, dim=-1)
        cosine[exclude] = -float("inf")
        k = min(top, len(self.words) - len(set(exclude)))
        best = torch.topk(cosine, k)
        return [(self.words[i], float(c)) for c, i in zip(best.values.tolist(), best.indices.tolist())]

    def similar(self, word: str, top: int = 10) -> list[tuple[str, float]]:
        i = self.lookup(word)
        return self.nearest(self.vectors()[i], [i], top)

    def analogy(self, a: str, b: str, c: str, top: int = 10) -> list[tuple[str, float]]:
        """a is to b as c is to ?: 3CosAdd, the nearest word to b - a + c over unit vectors (as gensim's
        most_similar(positive=[b, c], negative=[a])), the three given words left out."""
        ids = [self.lookup(w) for w in (a, b, c)]
        unit = F.normalize(self.vectors()[ids], dim=-1)
        return self.nearest(unit[1] - unit[0] + unit[2], ids, top)

    # -- files --

    def config(self) -> dict:
        return {"model_type": MODEL_TYPE, "architecture": self.architecture, "loss": self.loss, "dim": self.dim,
                "window": self.window, "negative": self.negative, "vocab_size": len(self.words)}

    def save(self, out: str | Path, **extra) -> None:
        """config.json (with `extra`, e.g. the training settings), model.safetensors, vocab.json and
        vectors.txt, all published together (engine/files.py)."""
        with output_dir(out) as tmp:
            write_tensors(tmp, self.state_dict())
            write_json(tmp / "vocab.json", {"words": self.words, "counts": self.counts.tolist()})
            write_text_format(tmp / "vectors.txt", self.words, self.vectors())
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
            write_json(tmp / "config.json", {**self.config(), "units": self.units, **extra})

    @classmethod
    def load(cls, path: str | Path) -> "Word2Vec":
        path = Path(path).expanduser()
        hint = "pass the --out directory of `parley train word2vec`"
        if not path.is_dir():
            raise ParleyError(f"{path} is not a directory: {hint}")
        config = read_json(path / "config.json", required=False)
        if config is None or config.get("model_type") != MODEL_TYPE:
            what = "has no config.json" if config is None else f"holds a {config.get('model_type')!r} model"
            raise ParleyError(f"{path} {what}, not a word2vec model: {hint}")
        vocab = read_json(path / "vocab.json", required=False)
        if not vocab or not isinstance(vocab.get("words"), list) or len(vocab["words"]) != config.get("vocab_size") \
                or len(vocab.get("counts", [])) != len(vocab["words"]):
            raise ParleyError(f"{path}/vocab.json is missing or does not match config.json's vocab_size: {hint}")
        tokenizer = None
        if config.get("units") == "tokens":
            from engine.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_dir(path)
        try:
            model = cls(vocab["words"], vocab["counts"], int(config["dim"]), config["architecture"], config["loss"],
                        int(config["window"]), int(config["negative"]), tokenizer=tokenizer)
        except (KeyError, TypeError, ValueError) as e:
            raise ParleyError(f"{path}/config.json lacks a word2vec setting ({e}): {hint}") from None
        found = read_tensors(path, torch.device("cpu"), torch.float32)
        check_tensors(path / SINGLE, dict(model.state_dict()), found)
        model.load_state_dict(found)
        return model


def write_text_format(path: Path, words: list[str], vectors: torch.Tensor) -> None:
    """The word2vec text format: "V dim", then one "word x1 … xdim" line per word. Nine significant
    digits give a float32 back exactly."""
    rows = vectors.float().cpu().numpy()
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{rows.shape[0]} {rows.shape[1]}\n")
        f.writelines(word + " " + " ".join(f"{x:.9g}" for x in row.tolist()) + "\n" for word, row in zip(words, rows))

