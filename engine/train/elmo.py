"""`parley train elmo`: a biLM (engine/models/elmo.py) on words (engine.train.config.ElmoConfig).

The corpus's training split is cut into sentences and words as word2vec cuts it (`sentences_of`),
and its vocabulary counted the same way (`vocabulary`). A row is a sentence between <s> and </s>
(a longer one is cut into rows of --max-len that overlap by a word). Rows hold word types, every
word of the corpus with its own characters, so a rare word is <unk> only as a target; each type's
characters and vocabulary id are looked up per batch.
"""
import math
import sys
from pathlib import Path

import torch

from engine import data
from engine.device import pick_device
from engine.errors import ParleyError
from engine.lm import LM
from engine.models.elmo import (
    BOS,
    EOS,
    SPECIALS,
    BiLM,
    BiLMConfig,
    char_ids,
    word_tokenizer,
)
from engine.train.config import ElmoConfig
from engine.train.progress import StepProgress
from engine.train.word2vec import sentences_of, vocabulary


def parse_filters(text: str) -> tuple[tuple[int, int], ...]:
    try:
        filters = tuple(tuple(int(v) for v in part.split(":")) for part in text.split(","))
    except ValueError:
        filters = ()
    if not filters or any(len(f) != 2 or min(f) < 1 for f in filters):
        raise ParleyError(f"--filters {text!r}: give width:count pairs of whole numbers 1 or more, comma-separated, "
                          "e.g. 1:32,2:32,3:64")
    return filters


class Rows:
    """Rows of word types ([BOS, words..., EOS], cut to max_len), with each type's characters and
    vocabulary id."""

    def __init__(self, sentences: list[list[str]], vocab: list[str], max_len: int, max_characters: int):
        types = list(SPECIALS) + sorted({w for s in sentences for w in s} - set(SPECIALS))
        index = {w: i for i, w in enumerate(types)}
        vocab_index = {w: i for i, w in enumerate(vocab)}
        self.chars = char_ids(types, max_characters)
        self.vocab_id = torch.tensor([vocab_index.get(w, 0) for w in types])   # 0: <unk>
        self.rows = []
        for s in sentences:
            ids = [index[w] for w in (BOS, *s, EOS)]
            # rows of a long sentence overlap by one word, so each pair of neighbours is in one row
            self.rows += [ids[i:i + max_len] for i in range(0, len(ids) - 1, max_len - 1)]

    def batch(self, rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vocabulary ids, characters, padding mask) of the given rows, right-padded."""
        width = max(len(self.rows[r]) for r in rows)
        types = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            types[i, :len(self.rows[r])] = torch.tensor(self.rows[r])
            mask[i, :len(self.rows[r])] = True
        return self.vocab_id[types].to(device), self.chars[types].to(device), mask.to(device)


@torch.no_grad()
def heldout_losses(model: BiLM, rows: Rows, batches: int, batch_size: int, device) -> tuple[float, float]:
    """The forward and backward LM's mean loss over the first `batches` batches of held-out rows."""
    model.eval()
    totals, count = [0.0, 0.0], 0
    for start in range(0, min(len(rows.rows), batches * batch_size), batch_size):
        ids, chars, mask = rows.batch(list(range(start, min(start + batch_size, len(rows.rows)))), device)
        n = int((mask[:, 1:] & mask[:, :-1]).sum())
        for k, loss in enumerate(model.losses(ids, chars, mask)):
            totals[k] += loss.item() * n
        count += n
    model.train()
    return totals[0] / count, totals[1] / count


def train_elmo(c: ElmoConfig, quiet: bool = False) -> LM:
    """The trained biLM as an LM with its word tokenizer; unless `quiet`, its progress on stderr."""
    def log(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr)
    filters = parse_filters(c.filters)
    train, heldout = data.load(c.data)
    sentences = sentences_of(train)
    words, _ = vocabulary(sentences, c.min_count)
    vocab = [*SPECIALS, *words]
    config = BiLMConfig(vocab_size=len(vocab), max_characters=c.max_characters, char_dim=c.char_dim, filters=filters,
                        highway_layers=c.highway_layers, projection_dim=c.projection_dim, hidden_size=c.hidden_size)
    device = pick_device(c.device)
    torch.manual_seed(c.seed)
    model = BiLM(config)
    model.set_vocabulary(vocab)
    model.to(device).train()
    rows = Rows(sentences, vocab, c.max_len, c.max_characters)
    held = Rows(sentences_of(heldout), vocab, c.max_len, c.max_characters)
    if not rows.rows:
        raise ParleyError(f"{c.data or 'chitchat'} has no sentence with a word: add text")
    log(f"elmo: {len(vocab)} words in the softmax (min count {c.min_count}), {len(rows.rows)} rows, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    g = torch.Generator().manual_seed(c.seed)
    order, at = torch.randperm(len(rows.rows), generator=g).tolist(), 0
    progress = None if quiet else StepProgress(c.max_steps, 0, ("loss", "fwd", "bwd"))
    for step in range(1, c.max_steps + 1):
        if at + c.batch_size > len(order):   # a new pass over the rows, freshly shuffled
            order, at = torch.randperm(len(rows.rows), generator=g).tolist(), 0
        fwd, bwd = model.losses(*rows.batch(order[at:at + c.batch_size], device))
        at += c.batch_size
        loss = (fwd + bwd) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        if progress is not None:
            progress.show(step, {"loss": loss.item(), "fwd": fwd.item(), "bwd": bwd.item()})
        if held.rows and (step % c.eval_every == 0 or step == c.max_steps):
            f, b = heldout_losses(model, held, c.eval_batches, c.batch_size, device)
            log(f"step {step}: held-out perplexity forward {math.exp(f):.2f}, backward {math.exp(b):.2f}")
    if progress is not None:
        progress.close()
    data_source = c.data if c.data in (None, "chitchat") else str(Path(c.data).expanduser().resolve())
    hf = {**config.to_hf(), "data": data_source or "chitchat", "min_count": c.min_count,
          "bos_token_id": vocab.index(BOS), "eos_token_id": vocab.index(EOS)}
    return LM(model.eval(), word_tokenizer(vocab), hf)


def run(c: ElmoConfig, store=None) -> LM:
    """`parley train elmo`; nothing goes to the store."""
    lm = train_elmo(c)
    lm.save(c.out)
    print(f"wrote {c.out}: a biLM over {lm.config['vocab_size']} words (parley similar --context, parley eval, "
          "parley generate --raw)", file=sys.stderr)
    return lm
