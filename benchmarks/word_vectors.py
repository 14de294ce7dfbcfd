"""The word-vector families on the planted corpora of their tests (README, "Model families").

    python benchmarks/word_vectors.py

word2vec (each architecture and loss): on the neighbours corpus, how many planted words have their
planted partner nearest; on the analogy corpus, how many of the 30 planted analogies
word{m}{k} : word{f}{k} :: word{m}{j} : ? 3CosAdd solves; skip-gram also over a byte-level BPE's
tokens (`--tokenizer`), one trained on each corpus. ELMo: on the two-senses corpus, how much
nearer each sense's "bank" is to its own sense than to the other (cosine of the top layer to each
sense's mean vector), next to word2vec's single "bank". Parameters and training time for each.
The corpora and the training settings are the tests' own (tests/test_word2vec.py, tests/test_elmo.py).
"""
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "tests")]
from test_elmo import (  # noqa: E402
    MONEY,
    MONEY_SENTENCE,
    RIVER,
    RIVER_SENTENCE,
    TINY,
    bank_corpus,
    sense_vectors,
)
from test_word2vec import (  # noqa: E402
    COMBOS,
    LETTERS,
    analogy_corpus,
    bpe_for,
    neighbours_corpus,
    train,
)

from engine.models.elmo import contextual_vectors  # noqa: E402
from engine.models.word2vec import words  # noqa: E402
from engine.train.config import ElmoConfig  # noqa: E402
from engine.train.elmo import train_elmo  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main():
    torch.set_num_threads(1)   # the tests' setting: tiny batches, threads would only wait
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # each in a folder of its own under the tests' file name: the held-out split hashes the name
        for name in ("near", "analogy", "bank"):
            (tmp / name).mkdir()
        near, analogies = neighbours_corpus(tmp / "near/corpus.txt"), analogy_corpus(tmp / "analogy/corpus.txt")
        print(f"{'model':<34}{'params':>8}{'train s':>9}  result")
        for architecture, loss in COMBOS:
            model, seconds = timed(lambda: train(near, architecture, loss))
            planted = [(f"alpha{t}", f"beta{t}") for t in LETTERS[:6]]
            hits = sum(model.similar(a, 1)[0][0] == b for pair in planted for a, b in (pair, pair[::-1]))
            model2, seconds2 = timed(lambda: train(analogies, architecture, loss))
            solved = sum(model2.analogy(f"wordm{a}", f"wordf{a}", f"wordm{b}", 1)[0][0] == f"wordf{b}"
                         for a in LETTERS[:6] for b in LETTERS[:6] if a != b)
            print(f"{f'word2vec {architecture} {loss}':<34}{parameters(model):>8}{seconds + seconds2:>9.1f}  "
                  f"neighbours {hits}/12 nearest, analogies {solved}/30 solved")
        # over a byte-level BPE's tokens (--tokenizer), as the language models read text
        tok = str(bpe_for(near, tmp / "near/bpe"))
        model, seconds = timed(lambda: train(near, "skipgram", "negative", tokenizer=tok))
        hits = sum(model.shown(model.similar(a, 1)[0][0]) == b for t in LETTERS[:6]
                   for a, b in ((f"alpha{t}", f"beta{t}"), (f"beta{t}", f"alpha{t}")))
        tok2 = str(bpe_for(analogies, tmp / "analogy/bpe"))
        model2, seconds2 = timed(lambda: train(analogies, "skipgram", "negative", tokenizer=tok2))
        solved = sum(model2.shown(model2.analogy(f"wordm{a}", f"wordf{a}", f"wordm{b}", 1)[0][0]) == f"wordf{b}"
                     for a in LETTERS[:6] for b in LETTERS[:6] if a != b)
        print(f"{'word2vec skipgram negative, BPE':<34}{parameters(model):>8}{seconds + seconds2:>9.1f}  "
              f"neighbours {hits}/12 nearest, analogies {solved}/30 solved")
        bank = bank_corpus(tmp / "bank/bank.txt")
        lm, seconds = timed(lambda: train_elmo(ElmoConfig(out=str(tmp / "elmo"), data=str(bank), max_steps=300,
                                                          device="cpu", **TINY), quiet=True))
        senses = sense_vectors(lm.model, bank, layer=2)
        cells = []
        for name, sentence in (("river", RIVER_SENTENCE), ("money", MONEY_SENTENCE)):
            v = contextual_vectors(lm.model, [words(sentence)], layer=2)[0][words(sentence).index("bank")]
            cos = {k: F.cosine_similarity(v, s, dim=0).item() for k, s in senses.items()}
            cells.append(f"{name} 'bank': cos {cos['river']:.2f} to river, {cos['money']:.2f} to money")
        print(f"{'ELMo biLM x2 (tiny, 300 steps)':<34}{parameters(lm.model):>8}{seconds:>9.1f}  " + "; ".join(cells))
        w2v = train(bank, "skipgram", "negative", window=3)
        nearest = [w for w, _ in w2v.similar("bank", 8)]
        print(f"{'word2vec on the same corpus':<34}{parameters(w2v):>8}{'':>9}  one 'bank': of its 8 nearest, "
              f"{sum(w in RIVER for w in nearest)} river and {sum(w in MONEY for w in nearest)} money words")


if __name__ == "__main__":
    main()
