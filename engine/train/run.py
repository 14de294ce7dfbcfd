"""One training run, whatever it trains: the lifecycle every `parley train` mode with optimizer
steps goes through (pretraining, SFT, the reward model, DPO, PPO, RLOO, GRPO).

- the models it starts from (`load_model`, `frozen_copy`): one loader, names resolved as
  everywhere else (a directory or a model known to the app);
- its record in the store: started (or taken up again on --resume), metrics per step, and
  finished, cancelled (Ctrl+C, SIGTERM) or failed with the error;
- its checkpoints under OUT/checkpoints (engine.train.resume) every `save_every` steps: the
  trained weights, optimizer and RNG state. Every step is a pure function of (seed, step) and that
  state, so a resumed run ends with the weights an uninterrupted one would have;
- its progress on stderr (engine.train.progress);
- its share of the work under torchrun (engine.train.distributed): each process takes every
  world-th item of a batch and weights its loss by its share of the whole batch; the trained
  modules are wrapped in torch's DistributedDataParallel, which averages their gradients during
  the backward pass. Only rank 0 writes anything.
"""
import copy
import os
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from engine.errors import ParleyError
from engine.files import output_dir
from engine.registry import register
from engine.train import distributed
from engine.train.progress import StepProgress
from engine.train.resume import newest_checkpoint, read_state, restore, save_checkpoint


def load_model(name: str, device, config=None):
    """A model to train or to start from, in float32: a directory or a model known to the app.
    With the config's --lora-r, only a LoRA adapter on it trains (engine/lora.py); an adapter
    directory is then that adapter to train on (a resumed run's checkpoint), and without
    --lora-r its base with the adapter merged in."""
    import engine
    from engine import lora
    from engine.registry import resolve_model
    path = resolve_model(name)
    r = getattr(config, "lora_r", None)
    if r is None:
        return engine.load(path, device=device, dtype="float32")
    if lora.is_adapter(path):
        lm = lora.load(path, device, "float32", merge_weights=False)
        if lm.r != r:
            raise ParleyError(f"{path} is a LoRA adapter of rank {lm.r}, not --lora-r {r}: pass --lora-r {lm.r} "
                              f"to train it on, or merge it first (parley merge {path} --out DIR)")
        return lm
    return lora.add(engine.load(path, device=device, dtype="float32"), name, r, config.lora_alpha,
                    config.lora_targets)


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A module that never trains: the reference policy of DPO, PPO, RLOO and GRPO. A copy, or
    for a LoRA policy the policy itself with its adapter off (one copy of the weights)."""
    from engine import lora
    if lora.adapted_layers(module):
        return lora.Reference(module)
    frozen = copy.deepcopy(module).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


class Run:
    def __init__(self, config, base_model: str | None, store=None, shown: tuple[str, ...] = ("loss",)):
        """`config` is the mode's dataclass (engine.train.config); `shown` the figures the progress
        display shows."""
        self.rank, self.world, self.device = distributed.setup(config.device)
        self.kind, self.config, self.base_model, self.out = config.mode, asdict(config), base_model, Path(config.out)
        self.max_steps, self.save_every, self.resume = config.max_steps, config.save_every, config.resume
        self.store = store if self.rank == 0 else None
        self.shown = shown
        self.id, self.output, self.start, self.progress = None, None, 0, None
        self.synced = set()   # ids of the parameters whose gradients DDP averages

    # -- start, resume, end -------------------------------------------------------------------------
    def restore(self, optimizer, modules: dict) -> dict:
        """For --resume: load the newest checkpoint into `modules` and `optimizer`, and return the
        state saved with it (its "step" is where to go on from); {} for a fresh run."""
        if not self.resume:
            return {}
        state, tensors = newest_checkpoint(self.out, lambda directory: read_state(directory, modules))
        restore(optimizer, state, tensors, self.device)
        self.id, self.start = state.get("run_id"), state.get("step", 0)
        if self.start >= self.max_steps:
            raise ParleyError(f"the checkpoint is at step {self.start}, already at --max-steps {self.max_steps}: "
                              "raise --max-steps")
        return state

    def __enter__(self):
        if self.store is not None:
            if self.id is None:
                self.id = self.store.start_run(self.kind, self.config, base_model=self.base_model, pid=os.getpid())
            else:
                self.store.resume_run(self.id, pid=os.getpid())
        if self.rank == 0:
            self.progress = StepProgress(self.max_steps, self.start, self.shown)
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if self.progress is not None:
                self.progress.close()
            if self.store is not None and self.id is not None:
                if error is None:
                    self.store.end_run(self.id, "finished", output_model=self.output)
                elif isinstance(error, KeyboardInterrupt):
                    self.store.end_run(self.id, "cancelled")
                else:
                    self.store.end_run(self.id, "failed", error=str(error))
        finally:
            distributed.teardown()

    # -- sharing the work ---------------------------------------------------------------------------
    def share(self, items: list) -> list:
        """This process's items of a batch."""
        if len(items) < self.world:
            raise ParleyError(f"a batch of {len(items)} cannot be shared by {self.world} processes: "
                              "make the batch larger or start fewer processes")
        return items[self.rank::self.world]

    def parallel(self, module: torch.nn.Module):
        """`module` to call in the training forward pass: under torchrun wrapped in DDP, which
        averages its gradients over the processes as the backward pass runs; else itself.
        (Parameters a loss never reaches, such as a reward model's unused lm_head, are allowed.)"""
        if not distributed.active():
            return module
        self.synced.update(id(p) for p in module.parameters())
        return DistributedDataParallel(module, find_unused_parameters=True, broadcast_buffers=False)

    def no_sync(self, module):
        """While accumulating gradients: no averaging until the last backward pass."""
        return module.no_sync() if isinstance(module, DistributedDataParallel) else nullcontext()

    # -- an optimizer step --------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass of this process's loss, its share of the whole batch's: DDP averages the
        processes' gradients, so x world gives their sum, the gradient of the whole batch."""
        (loss * self.world).backward()

    def step(self, optimizer, groups: list, max_norm: float = 1.0) -> list[float]:
        """Clip each group of parameters to `max_norm` on its own, then step. PPO's actor and critic
        are two groups: one clip over both would let the critic's larger gradients shrink the
        actor's step (DeepSpeed-Chat clips apart). Returns each group's norm before clipping."""
        groups = [[p for p in g if p.requires_grad] for g in groups]
        if self.world > 1 and any(id(p) not in self.synced for g in groups for p in g):
            raise RuntimeError("a trained module was not wrapped with Run.parallel: its gradients would differ "
                               "between processes")
        norms = [torch.nn.utils.clip_grad_norm_(parameters, max_norm).item() for parameters in groups]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norms

    def update(self, optimizer, loss: torch.Tensor, groups: list, max_norm: float = 1.0) -> list[float]:
        """One optimizer step on this process's share-weighted loss (`backward`, then `step`)."""
        optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        return self.step(optimizer, groups, max_norm)

    def end_step(self, step: int, values: dict, optimizer, modules: dict, state: dict | None = None,
                 lm=None) -> None:
        """Record and show a finished step; write a checkpoint every save_every steps and at the end
        (the trained `modules` as tensors, or `lm` as a whole model directory)."""
        if self.rank != 0:
            return
        if self.store is not None and self.id is not None:
            self.store.log_metrics(self.id, step, values)
        self.progress.show(step, values)
        if step % self.save_every == 0 or step == self.max_steps:
            save_checkpoint(self.out, step, optimizer, {**(state or {}), "run_id": self.id, "config": self.config},
                            modules, lm=lm)

    def save(self, write, model: bool = True) -> None:
        """Write the result into OUT (rank 0) with `write(directory)`, keeping OUT's checkpoints;
        a trained model is registered in the app, with the model it started from and this run."""
        if self.rank != 0:
            return
        with output_dir(self.out) as tmp:
            write(tmp)
        self.output = str(self.out)
        if model and self.store is not None:
            register(self.store, self.out, parent=self.base_model, run_id=self.id)
