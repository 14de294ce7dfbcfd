"""n-gram language models over a tokenizer's ids (Chen & Goodman 1998).

Smoothing methods:
  mle         maximum likelihood, c(hw) / c(h)
  add_k       (c(hw) + k) / (c(h) + k V); Laplace when k = 1
  katz        Good-Turing discounted counts (for counts up to 5) with Katz back-off (a context with
              only larger counts reserves Witten-Bell's estimate for unseen continuations)
  kneser_ney  interpolated modified Kneser-Ney: three discounts per order (D1, D2, D3+), lower
              orders on continuation counts, the unigram level interpolated with uniform

Every method backs off to a shorter context when a context was never seen. An example is padded
on the left with N - 1 copies of the tokenizer's BOS token, so the first tokens are predicted
from a "start of turn" context. Counts are kept as sorted arrays of n-gram keys (the n ids in
base V) with their counts, so lookups are binary searches, loading is a few array reads, and
probabilities for every position of a text are computed in one vectorised pass per order.
"""
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from engine.errors import ParleyError

METHODS = ("mle", "add_k", "katz", "kneser_ney")
KATZ_MAX = 5  # Good-Turing discounts counts up to this; larger counts are reliable as they are


def _group_sum(keys: np.ndarray, values: np.ndarray):
    """Unique sorted keys and the sum of values per key (keys need not be sorted)."""
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse, weights=values, minlength=len(unique))


def _lookup(table_keys: np.ndarray, table_values: np.ndarray, keys: np.ndarray, default=0.0) -> np.ndarray:
    """table_values at keys, `default` where a key is absent."""
    if len(table_keys) == 0:
        return np.full(len(keys), default, dtype=np.float64)
    i = np.searchsorted(table_keys, keys).clip(max=len(table_keys) - 1)
    found = table_keys[i] == keys
    return np.where(found, table_values[i], default).astype(np.float64)


class NGramLM:
    def __init__(self, order: int, vocab_size: int, bos_id: int, method: str = "kneser_ney", k: float = 1.0):
        if method not in METHODS:
            raise ParleyError(f"unknown n-gram smoothing {method!r}: use one of {', '.join(METHODS)}")
        if order < 1 or vocab_size ** order >= 2**62:
            raise ParleyError(f"order {order} does not fit: an n-gram key of {order} ids must fit in 62 bits")
        if method == "add_k" and not k > 0:
            raise ParleyError(f"add-k needs k > 0, got {k}")
        self.order, self.V, self.bos, self.method, self.k = order, vocab_size, bos_id, method, k
        self.keys: list[np.ndarray] = []    # per order n = 1..N: sorted n-gram keys
        self.counts: list[np.ndarray] = []  # their counts

    # -- training ------------------------------------------------------------------------------------
    def fit(self, sequences) -> "NGramLM":
        """Count every n-gram (n = 1..N) of the id sequences, padded with BOS on the left."""
        streams = [np.asarray([self.bos] * (self.order - 1) + list(s), dtype=np.int64) for s in sequences]
        self.keys, self.counts = [], []
        for n in range(1, self.order + 1):
            grams = []
            for s in streams:
                # n-grams ending at the real tokens only: the padding is context, never predicted
                ends = np.arange(self.order - 1, len(s))
                starts = ends - n + 1
                key = np.zeros(len(ends), dtype=np.int64)
                for j in range(n):
                    key = key * self.V + s[starts + j]
                grams.append(key)
            unique, counts = np.unique(np.concatenate(grams), return_counts=True)
            self.keys.append(unique)
            self.counts.append(counts.astype(np.int64))
        self._prepare()
        return self

    def _prepare(self) -> None:
        """Derived tables: per order, the counts the method uses and statistics per context."""
        V = self.V
        self.used = []       # per order: the count of each n-gram that the method uses
        for n in range(1, self.order + 1):
            counts = self.counts[n - 1].astype(np.float64)
            if self.method == "kneser_ney" and n < self.order:
                # continuation count: how many distinct tokens precede this n-gram
                suffixes = self.keys[n] % (V ** n)
                unique, cont = np.unique(suffixes, return_counts=True)
                counts = _lookup(unique, cont, self.keys[n - 1])
            self.used.append(counts)
        self.ctx = []        # per order: (sorted context keys, total, n1, n2, n3+, distinct)
        self.discounts = []  # per order: D1, D2, D3+ (Kneser-Ney) or Katz's d_r table
        for n in range(1, self.order + 1):
            contexts = self.keys[n - 1] // V
            c = self.used[n - 1]
            unique, total = _group_sum(contexts, c)
            stats = [_group_sum(contexts, (c == r).astype(float))[1] for r in (1, 2)]
            stats.append(_group_sum(contexts, (c >= 3).astype(float))[1])
            distinct = _group_sum(contexts, (c > 0).astype(float))[1]
            self.ctx.append((unique, total, *stats, distinct))
            nr = [np.sum(c == r) for r in range(0, KATZ_MAX + 3)]
            if self.method == "kneser_ney":
                self.discounts.append(_kn_discounts(nr))
            elif self.method == "katz":
                self.discounts.append(_katz_discounts(nr))
        if self.method == "katz":
            self._prepare_katz()

    def _prepare_katz(self) -> None:
        """Katz's back-off weights: the mass left by discounting, spread over the unseen tokens
        in proportion to the lower order's probabilities."""
        V = self.V
        self.alpha = []
        # Unigrams: the left-over mass goes to unseen tokens uniformly. If discounting left none
        # (tiny data), Good-Turing's estimate n1 / N is reserved for them; with no unseen token,
        # the seen ones are renormalised.
        c1 = self.used[0]
        seen_mass = float(np.sum(self._katz_discount(1, c1) * c1) / c1.sum())
        unseen = V - len(self.keys[0])
        unseen_mass = (max(1 - seen_mass, float(np.sum(c1 == 1)) / c1.sum()) if unseen else 0.0)
        self.unigram_unseen = unseen_mass / unseen if unseen else 0.0
        self.unigram_scale = (1 - unseen_mass) / seen_mass
        self.alpha, self.scale = [None], [None]
        for n in range(2, self.order + 1):
            keys, c = self.keys[n - 1], self.used[n - 1]
            contexts = keys // V
            ctx_keys, total = self.ctx[n - 1][0], self.ctx[n - 1][1]
            discounted = self._katz_discount(n, c) * c / _lookup(ctx_keys, total, contexts)
            lower = self._prob_order(n - 1, contexts % (V ** (n - 2)) if n > 2 else np.zeros_like(contexts),
                                     keys % V)
            _, kept = _group_sum(contexts, discounted)
            _, lower_seen = _group_sum(contexts, lower)
            # A context whose continuations were all seen more than KATZ_MAX times keeps all its
            # mass, which would make every unseen continuation impossible: it reserves Witten-
            # Bell's estimate, distinct continuations / (count + distinct), and scales the rest.
            distinct = self.ctx[n - 1][5]
            starved = 1 - kept < 1e-9
            reserve = distinct / (total + distinct)
            left = np.where(starved, reserve, 1 - kept)
            seen_scale = np.where(starved, (1 - reserve) / kept, 1.0)
            # A context that has seen every token the lower order gives mass to has nowhere to
            # put its left-over mass: its discounted estimates are renormalised instead.
            room = 1 - lower_seen > 1e-9
            alpha = np.where(room, left / np.where(room, 1 - lower_seen, 1), 0.0)
            self.alpha.append(np.maximum(alpha, 0.0))  # rounding must not make a probability negative
            self.scale.append(np.where(room, seen_scale, 1 / kept))

    def _katz_discount(self, n: int, c: np.ndarray) -> np.ndarray:
        table = self.discounts[n - 1]
        return np.where(c <= KATZ_MAX, table[np.minimum(c, KATZ_MAX).astype(int)], 1.0)

    # -- probabilities -------------------------------------------------------------------------------
    def prob(self, contexts: np.ndarray, words: np.ndarray) -> np.ndarray:
        """P(word | context) for rows of contexts [M, N-1] (ids, BOS-padded) and words [M]."""
        contexts = np.asarray(contexts, dtype=np.int64).reshape(len(words), -1)
        key = np.zeros(len(words), dtype=np.int64)
        for j in range(contexts.shape[1]):
            key = key * self.V + contexts[:, j]
        return self._prob_order(self.order, key, np.asarray(words, dtype=np.int64))

    def _prob_order(self, n: int, context: np.ndarray, word: np.ndarray) -> np.ndarray:
        """P at order n, where `context` holds the last n - 1 ids as one key."""
        V = self.V
        if n == 0:
            return np.full(len(word), 1.0 / V)
        ctx_keys, total, n1, n2, n3, distinct = self.ctx[n - 1]
        c_h = _lookup(ctx_keys, total, context)
        c_hw = _lookup(self.keys[n - 1], self.used[n - 1], context * V + word)
        lower_context = context % (V ** (n - 2)) if n > 2 else np.zeros_like(context)
        seen = c_h > 0
        safe = np.where(seen, c_h, 1.0)
        if self.method == "mle":
            if n == 1:
                return c_hw / safe
            return np.where(seen, c_hw / safe, self._prob_order(n - 1, lower_context, word))
        if self.method == "add_k":
            p = (c_hw + self.k) / (safe + self.k * V)
            if n == 1:
                return p
            return np.where(seen, p, self._prob_order(n - 1, lower_context, word))
        if self.method == "katz":
            if n == 1:
                seen_p = self._katz_discount(1, c_hw) * c_hw / self.used[0].sum() * self.unigram_scale
                return np.where(c_hw > 0, seen_p, self.unigram_unseen)
            alpha = _lookup(ctx_keys, self.alpha[n - 1], context, default=1.0)
            scale = _lookup(ctx_keys, self.scale[n - 1], context, default=1.0)
            lower = self._prob_order(n - 1, lower_context, word)
            return np.where(c_hw > 0, self._katz_discount(n, c_hw) * c_hw / safe * scale, alpha * lower)
        # interpolated modified Kneser-Ney
        d1, d2, d3 = self.discounts[n - 1]
        discount = np.where(c_hw >= 3, d3, np.where(c_hw == 2, d2, np.where(c_hw == 1, d1, 0.0)))
        gamma = (d1 * _lookup(ctx_keys, n1, context) + d2 * _lookup(ctx_keys, n2, context)
                 + d3 * _lookup(ctx_keys, n3, context)) / safe
        lower = self._prob_order(n - 1, lower_context, word)
        return np.where(seen, np.maximum(c_hw - discount, 0) / safe + gamma * lower, lower)

    def distribution(self, context: list[int]) -> np.ndarray:
        """P(w | context) for every w of the vocabulary."""
        return self.distributions([context])[0]

    def distributions(self, contexts: list[list[int]], rows_at_once: int = 64) -> np.ndarray:
        """P(w | context) [len(contexts), V] for every w, `rows_at_once` contexts per vectorised pass."""
        keep = self.order - 1
        padded = np.asarray([([self.bos] * keep + list(c))[len(c):] if keep else [] for c in contexts],
                            dtype=np.int64).reshape(len(contexts), keep)
        words = np.arange(self.V)
        out = np.empty((len(contexts), self.V))
        for first in range(0, len(contexts), rows_at_once):
            chunk = padded[first:first + rows_at_once]
            probs = self.prob(np.repeat(chunk, self.V, axis=0), np.tile(words, len(chunk)))
            out[first:first + len(chunk)] = probs.reshape(len(chunk), self.V)
        return out

    # -- files ---------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"model_type": "ngram", "order": self.order, "vocab_size": self.V, "bos_token_id": self.bos,
                "smoothing": self.method, "k": self.k}

    def save_weights(self, directory: Path) -> None:
        arrays = {}
        for n in range(1, self.order + 1):
            arrays[f"keys.{n}"] = self.keys[n - 1]
            arrays[f"counts.{n}"] = self.counts[n - 1]
        save_file(arrays, str(Path(directory) / "ngram.safetensors"))

    @classmethod
    def from_dir(cls, path: Path, config: dict) -> "NGramLM":
        lm = cls(config["order"], config["vocab_size"], config["bos_token_id"], config.get("smoothing", "kneser_ney"),
                 config.get("k", 1.0))
        arrays = load_file(str(Path(path) / "ngram.safetensors"))
        lm.keys = [arrays[f"keys.{n}"] for n in range(1, lm.order + 1)]
        lm.counts = [arrays[f"counts.{n}"] for n in range(1, lm.order + 1)]
        lm._prepare()
        return lm


def _kn_discounts(nr) -> tuple[float, float, float]:
    """Chen & Goodman's estimates of D1, D2, D3+ from the counts-of-counts n1..n4."""
    n1, n2, n3, n4 = (float(nr[i]) for i in (1, 2, 3, 4))
    # Ney's absolute discount; with no singletons at all it would be 0 and leave nothing for
    # unseen continuations, so 0.5 stands in.
    y = n1 / (n1 + 2 * n2) if n1 > 0 else 0.5
    if min(n1, n2, n3, n4) == 0:  # too little data for the estimate: plain absolute discounting
        return y, y, y
    estimates = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    # Skewed counts-of-counts can put an estimate outside (0, r], where it would make
    # probabilities negative or zero: such a D_r falls back to the absolute discount y.
    return tuple(d if 0 < d <= r else y for r, d in zip((1, 2, 3), estimates))


def _katz_discounts(nr) -> np.ndarray:
    """Katz's d_r for r = 0..KATZ_MAX: Good-Turing's r* / r, renormalised so that counts above
    KATZ_MAX keep their mass. Where the counts-of-counts make that ill-defined (a zero n_r, or a
    d_r outside (0, 1]), d_r = (r - D) / r with Ney's absolute discount D = n1 / (n1 + 2 n2), so
    some mass is always left for unseen continuations."""
    d = np.ones(KATZ_MAX + 1)
    n1, n2, nk1 = float(nr[1]), float(nr[2]), float(nr[KATZ_MAX + 1])
    absolute = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5
    common = (KATZ_MAX + 1) * nk1 / n1 if n1 else 1.0
    for r in range(1, KATZ_MAX + 1):
        dr = 0.0
        if nr[r] and common < 1:
            r_star = (r + 1) * nr[r + 1] / nr[r]
            dr = (r_star / r - common) / (1 - common)
        d[r] = dr if 0 < dr <= 1 else (r - absolute) / r
    return d


class NGramNetwork(torch.nn.Module):
    """The n-gram model behind the engine's model protocol: log-probabilities as logits for the
    last position, and a cache that keeps only the last N - 1 ids of each row."""

    def __init__(self, ngram: NGramLM):
        super().__init__()
        self.ngram = ngram
        self.register_buffer("anchor", torch.zeros(1))  # gives the module a device and a dtype
        self.tied_keys = []

    @property
    def lm_head(self):
        return self  # LM.device and LM.dtype read lm_head.weight

    @property
    def weight(self):
        return self.anchor

    def num_parameters(self) -> int:
        """A count-based model's size: its stored n-grams (it has no weights to count)."""
        return sum(len(k) for k in self.ngram.keys)

    def new_cache(self, batch: int, max_len: int) -> "NGramCache":
        return NGramCache(batch, self.ngram.order - 1)

    def forward(self, idx: torch.Tensor, cache=None, pad_mask=None, last_only: bool = False) -> torch.Tensor:
        rows = idx.tolist()
        real = [[True] * idx.shape[1]] * len(rows) if pad_mask is None else pad_mask.bool().tolist()
        # Padding never enters a history: a row's contexts are its real tokens only.
        histories = [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(rows, real)]
        if cache is not None:
            cache.push(histories)
            contexts = cache.histories
        else:
            contexts = []
            for history, mask in zip(histories, real):
                ends = np.cumsum(mask)   # real tokens up to each position (padding repeats the one before)
                contexts += [history[:end] for end in (ends[-1:] if last_only else ends)]
        with np.errstate(divide="ignore"):
            logp = np.log(self.ngram.distributions(contexts)).reshape(len(rows), -1, self.ngram.V)
        return torch.tensor(logp, dtype=torch.float32, device=idx.device)


class NGramCache:
    def __init__(self, batch: int, keep: int):
        self.histories = [[] for _ in range(batch)]
        self.keep = keep

    @property
    def batch(self) -> int:
        return len(self.histories)

    def push(self, rows: list[list[int]]) -> None:
        for history, row in zip(self.histories, rows):
            history.extend(row)
            del history[:max(0, len(history) - max(self.keep, 1))]

    def select_rows(self, index: torch.Tensor) -> None:
        self.histories = [list(self.histories[i]) for i in index.tolist()]
