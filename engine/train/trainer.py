"""`parley train pretrain` and `parley train sft`: one training loop, after nanoGPT.

- Data: examples are tokenized (SFT: loss on assistant tokens only), joined into one stream and
  cut into rows of seq_len + 1 tokens. The rows of step s are a pure function of (seed, s), so a
  resumed run sees exactly the batches an uninterrupted one would.
- `batch_size` counts sequences per optimizer step over all processes and accumulation steps,
  and the loss is the mean over the masked tokens of that whole batch: one process with
  --grad-accum 2 and two processes under torchrun compute the same update.
- AdamW with weight decay on matrices only, linear warm-up then cosine decay to lr x
  min_lr_ratio, gradient clipping, bfloat16 autocast on CUDA (and on request on the CPU, where
  CPUs with AVX-512 bf16 train about twice as fast).
- Checkpoints (engine.train.resume) are Hugging Face model directories under OUT/checkpoints/,
  with the optimizer and RNG state beside them. Under torchrun (engine.train.distributed) only
  rank 0 writes checkpoints, metrics and the final model in OUT.
"""
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import engine
from engine import data
from engine.errors import ParleyError
from engine.registry import register
from engine.tokenizer import Tokenizer
from engine.train import distributed
from engine.train.presets import new_lm
from engine.train.resume import checkpoints, newest_checkpoint, publish, read_state, restore, save_checkpoint


@dataclass
class TrainConfig:
    mode: str = "pretrain"          # pretrain: loss on every token; sft: on assistant tokens only
    out: str = "model"
    data: str | None = None         # chitchat (default), a .jsonl of conversations, or a text file
    model: str | None = None        # start from this checkpoint ...
    preset: str | None = None       # ... or from a fresh model of this size
    tokenizer: str | None = None    # the tokenizer directory of a fresh model
    seq_len: int = 256
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 200
    seed: int = 0
    device: str | None = None
    autocast: str = "auto"          # bf16 or none; auto: bf16 on CUDA, none on the CPU
    resume: bool = False


def lr_at(step: int, c: TrainConfig) -> float:
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pack(tokenizer, examples, assistant_only: bool, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n, seq_len + 1] of token ids and of loss masks, cut from all examples joined."""
    ids, mask = [], []
    for example in examples:
        i, m = data.encode(tokenizer, example, assistant_only)
        ids += i
        mask += m
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ParleyError(f"the data holds {len(ids)} tokens, fewer than one sequence of {seq_len + 1}: "
                          "add data or lower --seq-len")
    ids_t, mask_t = torch.tensor(ids[:n * seq_len + 1]), torch.tensor(mask[:n * seq_len + 1])
    starts = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None]
    return ids_t[starts], mask_t[starts]


class Batches:
    """Row indices of each optimizer step: epochs of seeded permutations, read in order."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n, self.size, self.seed, self.perms = n_rows, batch_size, seed, {}

    def rows(self, step: int) -> torch.Tensor:
        out = []
        for pos in range(step * self.size, (step + 1) * self.size):
            epoch = pos // self.n
            if epoch not in self.perms:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self.perms = {epoch: torch.randperm(self.n, generator=g)}
            out.append(self.perms[epoch][pos % self.n])
        return torch.stack(out)


def make_optimizer(model: torch.nn.Module, c: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: not on norms, biases (or anything one-dimensional).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=c.lr, betas=(0.9, 0.95), eps=1e-8)


# -- the loop ------------------------------------------------------------------------------------------
def train(c: TrainConfig, store=None) -> Path:
    """Run training; returns the output directory. `store` records the run (rank 0 only)."""
    if c.mode not in ("pretrain", "sft"):
        raise ParleyError(f"unknown training mode {c.mode!r}: use pretrain or sft")
    rank, world, device = distributed.setup(c.device)
    if c.batch_size % (world * c.grad_accum):
        raise ParleyError(f"--batch-size {c.batch_size} must be divisible by processes x --grad-accum "
                          f"({world} x {c.grad_accum})")
    out = Path(c.out)
    torch.manual_seed(c.seed)
    factory = lambda model: make_optimizer(model, c)  # noqa: E731
    state = {}
    if c.resume:
        def read(directory):
            return engine.load(directory, device=device, dtype="float32"), *read_state(directory)
        lm, state, tensors = newest_checkpoint(out, read)
        lm.model.train()
        optimizer = factory(lm.model)
        restore(optimizer, state, tensors, device)
    else:
        if c.model:
            lm = engine.load(c.model, device=device, dtype="float32")
        elif c.preset:
            if not c.tokenizer:
                raise ParleyError("a fresh model (--preset) needs --tokenizer DIR: train one with "
                                  "`parley train tokenizer`")
            lm = new_lm(c.preset, Tokenizer.from_dir(c.tokenizer), c.seed)
            lm.model.to(device)
        else:
            raise ParleyError("say what to train: --model DIR (an existing model) or --preset NAME with --tokenizer")
        lm.model.train()
        optimizer = factory(lm.model)
    start = state.get("step", 0)
    if start >= c.max_steps:
        raise ParleyError(f"the checkpoint is at step {start}, already at --max-steps {c.max_steps}: raise --max-steps")

    train_set, heldout = data.load(c.data)
    seq_len = min(c.seq_len, lm.max_context - 1)
    ids, mask = pack(lm.tokenizer, train_set, c.mode == "sft", seq_len)
    eval_ids, eval_mask = pack(lm.tokenizer, heldout, c.mode == "sft", seq_len) if heldout else (ids, mask)
    eval_ids, eval_mask = eval_ids[:c.eval_batches * c.batch_size], eval_mask[:c.eval_batches * c.batch_size]
    batches = Batches(len(ids), c.batch_size, c.seed)

    model = lm.model
    if c.autocast not in ("auto", "bf16", "none"):
        raise ParleyError(f"--autocast {c.autocast!r}: use auto, bf16 or none")
    bf16 = c.autocast == "bf16" or (c.autocast == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    run_id = state.get("run_id")
    if rank == 0 and store is not None:
        if run_id is None:
            run_id = store.start_run(c.mode, asdict(c), base_model=c.model or c.preset, pid=os.getpid())
        else:
            store.resume_run(run_id, pid=os.getpid())
    progress = Progress(c.max_steps, start) if rank == 0 else None
    try:
        for step in range(start, c.max_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, c)
            rows = batches.rows(step)
            count = mask[rows, 1:].sum().clamp(min=1)  # masked tokens in the whole global batch
            mine = rows[rank::world].chunk(c.grad_accum)
            loss_sum = torch.zeros((), device=device)
            for chunk in mine:
                x, y, m = ids[chunk, :-1].to(device), ids[chunk, 1:].to(device), mask[chunk, 1:].to(device)
                with autocast:
                    logits = model(x)
                    losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
                    total = (losses * m.flatten()).sum()
                    (total / count).backward()
                loss_sum += total.detach()
            distributed.sum_gradients(model.parameters())
            grad_norm = torch.nn.utils.clip_grad_norm_(lm.model.parameters(), c.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = distributed.sum_values([loss_sum.item()], device)[0] / count.item()
            if rank == 0:
                values = {"loss": loss, "lr": lr_at(step, c), "grad_norm": float(grad_norm),
                          "tokens_per_s": progress.tick(c.batch_size * seq_len)}
                if (step + 1) % c.eval_every == 0 or step + 1 == c.max_steps:
                    values["eval_loss"] = evaluate_rows(lm.model, eval_ids, eval_mask, c.batch_size, device, autocast)
                    values["eval_ppl"] = math.exp(min(values["eval_loss"], 50))
                progress.show(step + 1, values)
                if store is not None:
                    store.log_metrics(run_id, step + 1, values)
                if (step + 1) % c.save_every == 0 or step + 1 == c.max_steps:
                    save_checkpoint(out, step + 1, optimizer, {"run_id": run_id, "config": asdict(c)}, lm=lm)
        if rank == 0:
            publish(out, checkpoints(out)[-1])
            if store is not None:
                store.end_run(run_id, "finished", output_model=str(out))
                register(store, out)
            print(file=sys.stderr)
    except BaseException as e:
        if rank == 0 and store is not None and run_id is not None:
            cancelled = isinstance(e, KeyboardInterrupt)
            store.end_run(run_id, "cancelled" if cancelled else "failed", error=None if cancelled else str(e))
        raise
    finally:
        distributed.teardown()
    return out


@torch.no_grad()
def evaluate_rows(model, ids, mask, batch_size, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        x, y = ids[start:start + batch_size, :-1].to(device), ids[start:start + batch_size, 1:].to(device)
        m = mask[start:start + batch_size, 1:].to(device)
        with autocast:
            logits = model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        total += (losses * m.flatten()).sum().item()
        count += m.sum().item()
    model.train()
    return total / max(count, 1)


class Progress:
    """One line on stderr: step, loss, tokens/s and ETA; redrawn in place on a terminal."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0, self.last = total, start, time.perf_counter(), time.perf_counter()
        self.tty = sys.stderr.isatty()

    def tick(self, tokens: int) -> float:
        now = time.perf_counter()
        rate, self.last = tokens / max(now - self.last, 1e-9), now
        return rate

    def show(self, step: int, values: dict) -> None:
        done = step - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        text = (f"step {step}/{self.total}  loss {values['loss']:.4f}  lr {values['lr']:.2e}  "
                f"{values['tokens_per_s'] / 1000:.1f}k tok/s  ETA {int(eta // 60)}:{int(eta % 60):02d}")
        if "eval_loss" in values:
            text += f"  eval {values['eval_loss']:.4f} (ppl {values['eval_ppl']:.1f})"
        if self.tty:
            print("\r" + text, end="", file=sys.stderr, flush=True)
        elif "eval_loss" in values or step == self.total or done == 1:
            print(text, file=sys.stderr, flush=True)
