"""`parley train mlm`: BERT's masked-language-model pretraining (Devlin et al. 2019).

The same corpora and tokenizer as the causal families, so that their measures sit side by side:
every example's text (a conversation's messages, without a chat template: BERT does not chat) is
joined into one stream of ids and cut into rows [CLS] t1 … tn [SEP]. At each step 15% of the
real tokens of the step's rows are chosen (engine/models/bert.py mask_tokens, 80/10/10) and the
loss is the cross-entropy of the chosen ones. The corruption of step s is a pure function of
(seed, s), so a resumed run sees the masks an uninterrupted one would. Held out: the masked-LM
loss on the held-out split, and its pseudo-perplexity at the end (`parley eval` gives it too).
"""
import math

import torch

from engine import data
from engine.errors import ParleyError
from engine.models import bert
from engine.tokenizer import Tokenizer
from engine.train.config import MLMConfig
from engine.train.run import Run
from engine.train.trainer import Batches, make_optimizer

SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "pad_token": "[PAD]"}


def bert_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path` with BERT's four special tokens added (where it lacks them)."""
    tok = Tokenizer.from_dir(path)
    missing = [t for name, t in SPECIALS.items() if name not in tok.special_tokens and tok.token_id(t) is None]
    tok.tokenizer.add_special_tokens(missing)
    for name, text in SPECIALS.items():
        tok.config.setdefault(name, text)
        tok.special_tokens.setdefault(name, text)
    tok.chat_template = None   # not a chat model
    tok.config.pop("chat_template", None)
    return tok


def text_of(example) -> str:
    return example if isinstance(example, str) else "\n".join(m["content"] for m in example)


def rows(tok: Tokenizer, examples, seq_len: int) -> torch.Tensor:
    """[n, seq_len] rows [CLS] … [SEP] cut from all examples' ids joined."""
    ids = [i for e in examples for i in tok.encode(text_of(e), add_special_tokens=False)]
    body = seq_len - 2
    n = len(ids) // body
    if n < 1:
        raise ParleyError(f"the data holds {len(ids)} tokens, fewer than one row of {body}: add data or lower --seq-len")
    cls, sep = tok.token_id(tok.special_tokens["cls_token"]), tok.token_id(tok.special_tokens["sep_token"])
    stream = torch.tensor(ids[:n * body]).view(n, body)
    return torch.cat([torch.full((n, 1), cls), stream, torch.full((n, 1), sep)], dim=1)


def lr_at(step: int, c: MLMConfig) -> float:
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def corrupt(batch: torch.Tensor, tok: Tokenizer, c: MLMConfig, step: int, salt: int = 0):
    """The step's masked inputs and labels: [CLS] and [SEP] are never chosen."""
    g = torch.Generator().manual_seed(c.seed * 1_000_003 + step * 2 + salt)
    maskable = torch.ones_like(batch, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False
    return bert.mask_tokens(batch, maskable, tok.token_id(tok.special_tokens["mask_token"]), tok.vocab_size, g,
                            c.mask_rate)


def train_mlm(c: MLMConfig, store=None):
    """Train a fresh BERT; returns the output directory (a BertForMaskedLM directory)."""
    if c.lora_r is not None:
        raise ParleyError("--lora-r adapts a trained model; `parley train mlm` trains a fresh BERT: drop --lora-r")
    if c.hidden_size % c.heads:
        raise ParleyError(f"--heads {c.heads} does not divide --hidden-size {c.hidden_size}: pick one that does")
    if c.seq_len < 3:
        raise ParleyError(f"--seq-len {c.seq_len} leaves no room for text between [CLS] and [SEP]: use 3 or more")
    run = Run(c, None, store, shown=("loss", "lr", "grad_norm", "eval_loss"))
    if run.world > 1:
        raise ParleyError("parley train mlm runs in one process: start it without torchrun")
    tok = bert_tokenizer(c.tokenizer)
    torch.manual_seed(c.seed)
    config = bert.BertConfig(vocab_size=tok.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.layers,
                             num_attention_heads=c.heads, intermediate_size=4 * c.hidden_size,
                             max_position_embeddings=c.seq_len)
    model = bert.Bert(config)
    for name, p in model.named_parameters():   # BERT's initialisation: N(0, 0.02) matrices, zero biases
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    model.to(run.device).train()
    optimizer = make_optimizer(model, c)
    run.restore(optimizer, {"model": model})

    train_set, heldout = data.load(c.data)
    train_rows = rows(tok, train_set, c.seq_len)
    # a held-out split too small for one row (a tiny corpus) leaves the training rows to evaluate on
    try:
        eval_rows = rows(tok, heldout, c.seq_len)[:c.eval_batches * c.batch_size]
    except ParleyError:
        eval_rows = train_rows[:c.batch_size]
    batches = Batches(len(train_rows), c.batch_size, c.seed)
    with run:
        for step in range(run.start, c.max_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, c)
            inputs, labels = corrupt(train_rows[batches.rows(step)], tok, c, step)
            loss = bert.mlm_loss(model, inputs.to(run.device), labels.to(run.device))
            [grad_norm] = run.update(optimizer, loss, [model.parameters()], c.grad_clip)
            values = {"loss": loss.item(), "lr": lr_at(step, c), "grad_norm": grad_norm}
            if (step + 1) % c.eval_every == 0 or step + 1 == c.max_steps:
                values["eval_loss"] = heldout_loss(model, eval_rows, tok, c)
            run.end_step(step + 1, values, optimizer, {"model": model})
        model.eval()
        run.save(lambda directory: bert.write(model, tok, directory), model=False)
    return run.out


@torch.no_grad()
def heldout_loss(model: bert.Bert, eval_rows: torch.Tensor, tok: Tokenizer, c: MLMConfig) -> float:
    """The masked-LM loss on held-out rows, with one fixed corruption (the same at every evaluation)."""
    model.eval()
    device = model.bert.embeddings.word_embeddings.weight.device
    inputs, labels = corrupt(eval_rows, tok, c, 0, salt=1)
    total = count = 0
    for start in range(0, len(eval_rows), c.batch_size):
        part = slice(start, start + c.batch_size)
        n = int((labels[part] != bert.IGNORE).sum())
        total += bert.mlm_loss(model, inputs[part].to(device), labels[part].to(device)).item() * n
        count += n
    model.train()
    return total / max(count, 1)
