"""`parley eval`: held-out loss and perplexity, per token and per word, of one model or of
several in one table.

Per-word perplexity divides the same total log-loss by the number of words (whitespace-separated,
plus one end-of-turn per message or line), so models with different tokenizers compare fairly.
Every token after the first of each example is scored once; long examples are read in windows of
the model's context, each window starting with the last token of the one before.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import data
from engine.train.logprobs import summed_loss


def words(example) -> int:
    if isinstance(example, str):
        return len(example.split()) + 1
    return sum(len(m["content"].split()) + 1 for m in example)


@torch.no_grad()
def evaluate(lm, examples, max_examples: int | None = None) -> dict:
    total, tokens, n_words = 0.0, 0, 0
    window = lm.max_context
    for example in examples[:max_examples]:
        ids, _ = data.encode(lm.tokenizer, example)
        for start in range(0, len(ids) - 1, window - 1):
            chunk = torch.tensor(ids[start:start + window], device=lm.device)[None]
            total += summed_loss(lm.model, chunk, torch.ones(1, chunk.shape[1] - 1, device=lm.device)).item()
            tokens += chunk.shape[1] - 1
        n_words += words(example)
    return {"examples": len(examples[:max_examples]), "tokens": tokens, "words": n_words,
            "loss_per_token": total / tokens, "ppl_per_token": math.exp(total / tokens),
            "ppl_per_word": math.exp(total / n_words)}


@torch.no_grad()
def evaluate_bert(model, tokenizer, examples, max_examples: int | None = None) -> dict:
    """BERT's pseudo-perplexity (engine/models/bert.py): each token predicted from all the others,
    in windows of the model's positions, [CLS] … [SEP] around each. Not comparable with a causal
    model's perplexity, which sees only the left: `measure` says which one a row holds."""
    from engine.models import bert
    from engine.train.mlm import text_of
    cls, sep, mask = bert.special_ids(tokenizer, "cls_token", "sep_token", "mask_token")
    body = model.config.max_position_embeddings - 2
    scores, n_words = [], 0
    for example in examples[:max_examples]:
        ids = tokenizer.encode(text_of(example), add_special_tokens=False)
        for start in range(0, len(ids), body):
            row = [cls, *ids[start:start + body], sep]
            scores += bert.pseudo_log_likelihoods(model, row, [False] + [True] * (len(row) - 2) + [False], mask)
        n_words += words(example)
    total = -sum(scores)
    return {"examples": len(examples[:max_examples]), "tokens": len(scores), "words": n_words,
            "loss_per_token": total / len(scores), "ppl_per_token": math.exp(total / len(scores)),
            "ppl_per_word": math.exp(total / n_words), "measure": "pseudo-perplexity"}


def describe(config: dict) -> str:
    """A model's family in a few words, from its config.json."""
    kind = config.get("model_type")
    if kind == "ngram":
        k = f", k={config['k']:g}" if config["smoothing"] == "add_k" else ""
        return f"{config['order']}-gram {config['smoothing']}{k}"
    if kind == "parley_nnlm":
        return f"NNLM n={config['context'] + 1}" + (" +direct" if config.get("direct") else "")
    if kind == "parley_elmo":   # scored by its forward LM, the direction that can generate
        return f"ELMo biLM x{config['num_layers']} (forward)"
    if kind == "parley_rnn":
        return f"{config['cell'].upper()} x{config['num_layers']}"
    if kind == "parley_gpt":
        sizes = ", ".join(f"{name} {config[f'attention_{name}']}" for name in ("window", "stride")
                          if config.get(f"attention_{name}"))
        return f"GPT {config['attention_pattern']} ({sizes})"
    return {"gpt2": "GPT dense", "llama": "Llama", "bert": "BERT (pseudo-ppl*)"}.get(kind, kind)


def size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def compare(models: dict, examples, max_examples: int | None = None) -> list[dict]:
    """`evaluate` for each loaded model of {name: lm}, with its family, size and evaluation time."""
    rows = []
    for name, lm in models.items():
        start = time.perf_counter()
        if isinstance(lm, BertModel):
            result = evaluate_bert(lm.model, lm.tokenizer, examples, max_examples)
            config, parameters = {"model_type": "bert"}, sum(p.numel() for p in lm.model.parameters())
        else:
            result = {**evaluate(lm, examples, max_examples), "measure": "perplexity"}
            config, parameters = lm.config, lm.num_parameters()
        rows.append({"model": name, "family": describe(config), "parameters": parameters,
                     "bytes": size_on_disk(lm.path) if lm.path else None, **result,
                     "eval_seconds": time.perf_counter() - start})
    return rows


@dataclass
class BertModel:
    """A BERT to evaluate beside the causal models (engine.models.bert.load gives model and tokenizer)."""
    model: object
    tokenizer: object
    path: Path


def load_for_eval(path: Path, device, dtype):
    """A causal model, or a BERT directory (which engine.load refuses: it cannot decode)."""
    import engine
    from engine.checkpoint import read_json
    config = read_json(path / "config.json", required=False) if path.is_dir() else None
    if (config or {}).get("model_type") == "bert":
        from engine.models import bert
        model, tokenizer = bert.load(path, device or "cpu")
        return BertModel(model, tokenizer, path)
    return engine.load(path, device=device, dtype=dtype, decode_only=True)


def table(rows: list[dict]) -> str:
    """The rows of `compare` as an aligned text table, best per-word perplexity first."""
    head = ("model", "family", "params", "MB", "ppl/token", "ppl/word")
    lines = [head]
    for r in sorted(rows, key=lambda r: r["ppl_per_word"]):
        params = f"{r['parameters'] / 1e6:.2f}M" + (" n-grams" if "gram" in r["family"] else "")
        size = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] is not None else "-"
        lines.append((r["model"], r["family"], params, size, f"{r['ppl_per_token']:.2f}", f"{r['ppl_per_word']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    note = ("\n* pseudo-perplexity: each token from all the others (a bidirectional model's measure, "
            "lower than a causal model's by construction; compare BERTs with BERTs)"
            if any(r.get("measure") == "pseudo-perplexity" for r in rows) else "")
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines) + note
