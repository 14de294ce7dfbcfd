"""`parley train word2vec`: word vectors by skip-gram or CBOW (engine.train.config.Word2VecConfig).

The corpus (engine/data.py: chitchat, a .jsonl of conversations or a .txt; its training split) is
cut into sentences, a line or a message each, and each sentence into words (engine/models/word2vec.py
`words`). An epoch is three tensor passes over the whole corpus, no loop per pair: sub-sample,
draw each centre word's window, and gather every (context, centre) pair at each offset. The pairs
are then shuffled and fed to SGD in batches.
"""
import math
import sys
from collections import Counter

import numpy as np
import torch

from engine import data
from engine.device import pick_device
from engine.errors import ParleyError
from engine.models.word2vec import Word2Vec, keep_probability, tokens, words
from engine.tokenizer import Tokenizer
from engine.train.config import Word2VecConfig
from engine.train.progress import StepProgress

DEFAULT_LR = {"skipgram": 0.025, "cbow": 0.05}
MIN_LR_RATIO = 1e-4   # word2vec.c's floor: the rate never quite reaches 0
MAX_RATE = 1.0       # the most one batch may move a vector, in units of its gradients' mean (sgd_step)


def sentences_of(examples, tokenizer=None) -> list[list[str]]:
    """The words (or `tokenizer`'s tokens) of each line (text) or message (conversation) that has any."""
    texts = (t for e in examples for t in ([e] if isinstance(e, str) else (m["content"] for m in e)))
    units = words if tokenizer is None else lambda text: tokens(tokenizer, text)
    return [s for s in map(units, texts) if s]


def vocabulary(sentences: list[list[str]], min_count: int) -> tuple[list[str], list[int]]:
    """The words seen at least `min_count` times, most frequent first (ties in alphabetical order, so a
    corpus gives one vocabulary), and their counts."""
    counts = Counter(w for s in sentences for w in s)
    kept = sorted(((c, w) for w, c in counts.items() if c >= min_count), key=lambda cw: (-cw[0], cw[1]))
    if len(kept) < 2:
        raise ParleyError(f"only {len(kept)} words occur at least --min-count {min_count} times in "
                          f"{sum(counts.values())} words of text: add data or lower --min-count")
    return [w for _, w in kept], [c for c, _ in kept]


def encode(sentences: list[list[str]], index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, sentence number) of every in-vocabulary word, the corpus in one row. Words left out of
    the vocabulary go before windows are drawn, as in word2vec.c."""
    ids, sentence = [], []
    for n, s in enumerate(sentences):
        kept = [index[w] for w in s if w in index]
        ids += kept
        sentence += [n] * len(kept)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(sentence, dtype=torch.long)


def epoch_examples(ids: torch.Tensor, sentence: torch.Tensor, keep: torch.Tensor, window: int, cbow: bool,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One epoch's (context, target, mask), shuffled. Skip-gram: one row per (context word, centre
    word) pair, context [P]. CBOW: one row per centre word with any context, context and mask [P, 2 window]."""
    kept = torch.rand(len(ids), generator=g) < keep[ids]
    ids, sentence = ids[kept], sentence[kept]
    n = len(ids)
    reach = torch.randint(1, window + 1, (n,), generator=g)   # each centre word's window, as word2vec.c draws it
    centre = torch.arange(n)
    offsets = [o for d in range(1, window + 1) for o in (-d, d)]
    position = centre[:, None] + torch.tensor(offsets)[None, :]           # [n, 2 window]
    inside = (position >= 0) & (position < n)
    position = position.clamp(0, max(n - 1, 0))
    valid = inside & (sentence[position] == sentence[:, None]) & (torch.tensor(offsets).abs()[None, :] <= reach[:, None])
    if cbow:
        rows = valid.any(1)
        context, mask, target = ids[position[rows]], valid[rows].float(), ids[rows]
    else:
        row, col = valid.nonzero(as_tuple=True)
        context, mask, target = ids[position[row, col]], None, ids[row]
    order = torch.randperm(len(target), generator=g)
    return context[order], target[order], None if mask is None else mask[order]


def sgd_step(model: Word2Vec, lr: float) -> None:
    """Move each vector a batch used by lr x the sum of its examples' gradients, the rate capped at
    MAX_RATE / uses for a vector the batch used more than MAX_RATE / lr times.

    word2vec.c updates after every example, so a word seen n times moves n small steps, each seeing
    the last; their sum is one example's step each, which a batch gives as long as lr x n is small
    (nearly every word of a real vocabulary). A word a batch holds hundreds of times (a tiny
    vocabulary, or "the" as a negative) would move hundreds of steps at once, blind to each other,
    and training diverges: so its steps together move it at most a rate of MAX_RATE. The
    embeddings' sparse gradients hold one row per lookup (uncoalesced), so the uses are counted
    from them (a row of zeros is padding: a CBOW window's empty places, a short Huffman path's end).
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is None:
                continue
            lookups, grads = p.grad._indices()[0], p.grad._values()
            uses = torch.zeros(p.shape[0], device=p.device).index_add_(0, lookups, grads.ne(0).any(1).float())
            rate = torch.clamp(MAX_RATE / uses.clamp(min=1), max=lr)
            p.index_add_(0, lookups, grads * rate[lookups, None], alpha=-1)   # adds up repeated rows: no coalescing sort
            p.grad = None


def train_word2vec(c: Word2VecConfig, quiet: bool = False) -> Word2Vec:
    """The trained model; unless `quiet`, a line per epoch and each epoch's progress on stderr."""
    def log(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr)
    tokenizer = Tokenizer.from_dir(c.tokenizer) if c.tokenizer else None
    train, _ = data.load(c.data)
    sentences = sentences_of(train, tokenizer)
    vocab, counts = vocabulary(sentences, c.min_count)
    spaced = next((w for w in vocab if any(ch.isspace() for ch in w)), None)
    if spaced is not None:
        raise ParleyError(f"the tokenizer's token {spaced!r} holds whitespace, which the word2vec text format cannot: "
                          "use a byte-level BPE or SentencePiece tokenizer (or none, for words)")
    device = pick_device(c.device)
    model = Word2Vec(vocab, counts, c.dim, c.architecture, c.loss, c.window, c.negative, c.seed,
                     tokenizer=tokenizer).to(device)
    ids, sentence = encode(sentences, model.index)
    keep = torch.from_numpy(keep_probability(np.asarray(counts, dtype=np.float64), c.sample)).float()
    lr = c.lr if c.lr is not None else DEFAULT_LR[c.architecture]
    g = torch.Generator().manual_seed(c.seed)
    noise = torch.Generator(device).manual_seed(c.seed + 1)
    log(f"word2vec: {len(vocab)} {model.units} (min count {c.min_count}), {len(ids)} tokens in {len(sentences)} sentences, "
        f"{c.architecture} with {'negative sampling' if c.loss == 'negative' else 'hierarchical softmax'}")
    for epoch in range(c.epochs):
        context, target, mask = epoch_examples(ids, sentence, keep, c.window, c.architecture == "cbow", g)
        if len(target) == 0:
            raise ParleyError("no word has a neighbour within --window after sub-sampling: add data, widen "
                              "--window or lower --sample")
        steps, total = math.ceil(len(target) / c.batch_size), 0.0
        progress_bar = None if quiet else StepProgress(steps, 0, ("loss", "lr"))
        for step in range(steps):
            # linear decay over all epochs, as word2vec.c decays over the words it has read
            progress = (epoch + step / steps) / c.epochs
            batch = slice(step * c.batch_size, (step + 1) * c.batch_size)
            loss = model(context[batch].to(device), target[batch].to(device),
                         None if mask is None else mask[batch].to(device), noise).sum()
            loss.backward()
            rate = lr * max(MIN_LR_RATIO, 1 - progress)
            sgd_step(model, rate)
            value = loss.item()
            total += value
            if progress_bar is not None:
                progress_bar.show(step + 1, {"loss": value / len(target[batch]), "lr": rate})
        if progress_bar is not None:
            progress_bar.close()
        log(f"epoch {epoch + 1}/{c.epochs}: loss {total / len(target):.4f} per "
            f"{'pair' if c.architecture == 'skipgram' else 'centre word'} ({len(target)})")
    return model


def run(c: Word2VecConfig, store=None) -> Word2Vec:
    """`parley train word2vec`; nothing goes to the store."""
    model = train_word2vec(c)
    model.save(c.out, sample=c.sample, min_count=c.min_count, epochs=c.epochs, seed=c.seed)
    print(f"wrote {c.out}: {len(model.words)} {model.units} x {c.dim} (vectors.txt is the word2vec text format)",
          file=sys.stderr)
    return model
