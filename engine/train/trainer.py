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
- SFT with --aux-lm λ is GPT-1's fine-tuning objective (Radford et al. 2018, eq. 5): the
  assistant-token loss plus λ times the language-model loss on the other tokens, one forward pass.
- With --lora-r only a LoRA adapter trains (engine/lora.py): the checkpoints and OUT are adapter
  directories, and the optimizer holds the adapter's state only.
"""
import math
from contextlib import nullcontext

import torch

from engine import data
from engine.errors import ParleyError
from engine.tokenizer import Tokenizer
from engine.train import distributed
from engine.train.config import PretrainConfig, SFTConfig
from engine.train.logprobs import split_loss
from engine.train.presets import new_lm
from engine.train.resume import newest_checkpoint
from engine.train.run import Run, load_model


def lr_at(step: int, c: PretrainConfig) -> float:
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


def make_optimizer(model: torch.nn.Module, c: PretrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only: not on norms, biases (or anything one-dimensional).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=c.lr, betas=(0.9, 0.95), eps=1e-8)


# -- the loop ------------------------------------------------------------------------------------------
def start_model(c: PretrainConfig, device):
    """The model a run starts from: --model, or a fresh --preset with --tokenizer."""
    if c.model:
        return load_model(c.model, device, c)
    if c.preset and c.lora_r is not None:
        raise ParleyError("--lora-r adapts a trained model: pass --model DIR (a fresh --preset trains every weight)")
    if c.preset:
        if not c.tokenizer:
            raise ParleyError("a fresh model (--preset) needs --tokenizer DIR: train one with `parley train tokenizer`")
        lm = new_lm(c.preset, Tokenizer.from_dir(c.tokenizer), c.seed)
        lm.model.to(device)
        return lm
    raise ParleyError("say what to train: --model DIR (an existing model) or --preset NAME with --tokenizer")


def train(c: PretrainConfig, store=None):
    """Run pretraining or SFT (c.mode); returns the output directory. `store` records the run."""
    if c.autocast not in ("auto", "bf16", "none"):
        raise ParleyError(f"--autocast {c.autocast!r}: use auto, bf16 or none")
    sft = isinstance(c, SFTConfig)
    aux_lm = c.aux_lm if sft else 0.0
    # SFT also logs the loss on the tokens it does not learn from, to show what --aux-lm keeps
    shown = ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_ppl")
    run = Run(c, c.model or c.preset, store, shown=shown + (("lm_loss", "eval_lm_loss") if sft else ()))
    if c.batch_size % (run.world * c.grad_accum):
        raise ParleyError(f"--batch-size {c.batch_size} must be divisible by processes x --grad-accum "
                          f"({run.world} x {c.grad_accum})")
    torch.manual_seed(c.seed)
    # A resumed run takes its model from the checkpoint, a whole model directory: --resume alone is enough.
    lm = newest_checkpoint(run.out, lambda d: load_model(str(d), run.device, c)) if c.resume else start_model(c, run.device)
    lm.model.train()
    optimizer = make_optimizer(lm.model, c)
    run.restore(optimizer, {})

    train_set, heldout = data.load(c.data)
    seq_len = min(c.seq_len, lm.max_context - 1)
    ids, mask = pack(lm.tokenizer, train_set, c.mode == "sft", seq_len)
    eval_ids, eval_mask = pack(lm.tokenizer, heldout, c.mode == "sft", seq_len) if heldout else (ids, mask)
    eval_ids, eval_mask = eval_ids[:c.eval_batches * c.batch_size], eval_mask[:c.eval_batches * c.batch_size]
    batches = Batches(len(ids), c.batch_size, c.seed)

    device = run.device
    bf16 = c.autocast == "bf16" or (c.autocast == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    model = run.parallel(lm.model)
    with run:
        for step in range(run.start, c.max_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, c)
            rows = batches.rows(step)
            count = mask[rows, 1:].sum().clamp(min=1)  # masked tokens in the whole global batch
            others = (1 - mask[rows, 1:]).sum().clamp(min=1)   # the auxiliary loss's tokens
            mine = rows[run.rank::run.world].chunk(c.grad_accum)
            sums = torch.zeros(2, device=device)
            for i, chunk in enumerate(mine):
                with run.no_sync(model) if i < len(mine) - 1 else nullcontext():
                    with autocast:
                        total, aux = split_loss(model, ids[chunk].to(device), mask[chunk, 1:].to(device))
                    # GPT-1 writes both terms as sums over their tokens (L3 = L2 + λ·L1); dividing by
                    # the assistant tokens alone keeps λ = 0 exactly plain SFT.
                    run.backward((total + aux_lm * aux) / count)
                sums += torch.stack([total.detach(), aux.detach()])
            [grad_norm] = run.step(optimizer, [lm.model.parameters()], c.grad_clip)
            loss_sum, aux_sum = distributed.sum_values(sums.tolist(), device)
            if run.rank == 0:
                values = {"loss": loss_sum / count.item(), "lr": lr_at(step, c), "grad_norm": grad_norm,
                          "tokens_per_s": c.batch_size * seq_len / run.progress.seconds_since_last()}
                if sft:
                    values["lm_loss"] = aux_sum / others.item()
                if (step + 1) % c.eval_every == 0 or step + 1 == c.max_steps:
                    values["eval_loss"], eval_lm_loss = evaluate_rows(lm.model, eval_ids, eval_mask, c.batch_size,
                                                                      device, autocast)
                    values["eval_ppl"] = math.exp(min(values["eval_loss"], 50))
                    if sft:
                        values["eval_lm_loss"] = eval_lm_loss
                run.end_step(step + 1, values, optimizer, {}, lm=lm)
        lm.model.eval()
        run.save(lm.write)
    return run.out


@torch.no_grad()
def evaluate_rows(model, ids, mask, batch_size, device, autocast) -> tuple[float, float]:
    """The mean next-token loss of held-out rows over their masked tokens, and over the others."""
    model.eval()
    totals, counts = [0.0, 0.0], [0, 0]
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        with autocast:
            losses = split_loss(model, ids[rows].to(device), mask[rows, 1:].to(device))
        for k, (loss, n) in enumerate(zip(losses, (mask[rows, 1:].sum(), (1 - mask[rows, 1:]).sum()))):
            totals[k] += loss.item()
            counts[k] += n.item()
    model.train()
    return totals[0] / max(counts[0], 1), totals[1] / max(counts[1], 1)
