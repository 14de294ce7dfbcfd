"""`parley eval`: held-out loss and perplexity, per token and per word.

Per-word perplexity divides the same total log-loss by the number of words (whitespace-separated,
plus one end-of-turn per message or line), so models with different tokenizers compare fairly.
Every token after the first of each example is scored once; long examples are read in windows of
the model's context, each window starting with the last token of the one before.
"""
import math

import torch
import torch.nn.functional as F

from engine import data


def words(example) -> int:
    if isinstance(example, str):
        return len(example.split()) + 1
    return sum(len(m["content"].split()) + 1 for m in example)


@torch.no_grad()
def evaluate(lm, examples, max_examples: int | None = None) -> dict:
    total, tokens, n_words = 0.0, 0, 0
    window = lm.max_context
    ngram = getattr(lm.model, "ngram", None)
    for example in examples[:max_examples]:
        ids, _ = data.encode(lm.tokenizer, example)
        if ngram is not None:  # every position at once; the first token (BOS) is context, as below
            total -= float(ngram.sequence_logprob(ids)[1:].sum())
            tokens += len(ids) - 1
            n_words += words(example)
            continue
        for start in range(0, len(ids) - 1, window - 1):
            chunk = torch.tensor(ids[start:start + window], device=lm.device)[None]
            logits = lm.model(chunk).float()
            total += F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
            tokens += chunk.shape[1] - 1
        n_words += words(example)
    return {"examples": len(examples[:max_examples]), "tokens": tokens, "words": n_words,
            "loss_per_token": total / tokens, "ppl_per_token": math.exp(total / tokens),
            "ppl_per_word": math.exp(total / n_words)}
