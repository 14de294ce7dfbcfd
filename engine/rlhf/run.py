"""One RLHF training run (reward model, DPO or PPO): what the three trainers share.

- its record in the store: started (or taken up again on --resume), metrics per step, and
  finished, cancelled (Ctrl+C, SIGTERM) or failed with the error;
- its checkpoints under OUT/checkpoints (engine.train.resume): the trained weights, optimizer and
  RNG state every `save_every` steps. Every step is a pure function of (seed, step) and that
  state, so a resumed run ends with the weights an uninterrupted one would have;
- its share of the work under torchrun (engine.train.distributed): each process takes every
  world-th item of a batch and weights its loss by its share; only rank 0 writes anything.
"""
import os
import tempfile
from pathlib import Path

import torch

from engine.errors import ParleyError
from engine.registry import register
from engine.train import distributed
from engine.train.resume import newest_checkpoint, publish, read_state, restore, save_checkpoint


class Run:
    def __init__(self, kind: str, config: dict, base_model: str, out: str, store=None, device=None,
                 resume: bool = False, save_every: int = 50):
        self.rank, self.world, self.device = distributed.setup(device)
        self.kind, self.config, self.base_model, self.out = kind, config, base_model, Path(out)
        self.store = store if self.rank == 0 else None
        self.resume, self.save_every = resume, save_every
        self.id, self.output = None, None

    def restore(self, optimizer, modules: dict) -> dict:
        """For --resume: load the newest checkpoint into `modules` and `optimizer`, and return the
        state saved with it (its "step" is where to go on from); {} for a fresh run."""
        if not self.resume:
            return {}
        state, tensors = newest_checkpoint(self.out, lambda directory: read_state(directory, modules))
        restore(optimizer, state, tensors, self.device)
        self.id = state.get("run_id")
        return state

    def __enter__(self):
        if self.store is not None:
            if self.id is None:
                self.id = self.store.start_run(self.kind, self.config, base_model=self.base_model, pid=os.getpid())
            else:
                self.store.resume_run(self.id, pid=os.getpid())
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if self.store is not None and self.id is not None:
                if error is None:
                    self.store.end_run(self.id, "finished", output_model=self.output)
                elif isinstance(error, KeyboardInterrupt):
                    self.store.end_run(self.id, "cancelled")
                else:
                    self.store.end_run(self.id, "failed", error=str(error))
        finally:
            distributed.teardown()

    def share(self, items: list) -> list:
        """This process's items of a batch."""
        if len(items) < self.world:
            raise ParleyError(f"a batch of {len(items)} cannot be shared by {self.world} processes: "
                              "make the batch larger or start fewer processes")
        return items[self.rank::self.world]

    def update(self, optimizer, loss, groups: list) -> list[float]:
        """One optimizer step on this process's (share-weighted) loss: gradients summed over the
        processes, then each group of parameters clipped to norm 1 on its own, so every process
        makes the same update. PPO's actor and critic are two groups: one clip over both would
        let the critic's larger gradients shrink the actor's step (DeepSpeed-Chat clips apart).
        Returns each group's gradient norm before clipping."""
        groups = [list(g) for g in groups]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms = []
        for parameters in groups:
            distributed.sum_gradients(parameters)
            norms.append(torch.nn.utils.clip_grad_norm_(parameters, 1.0).item())
        optimizer.step()
        return norms

    def end_step(self, step: int, max_steps: int, values: dict, optimizer, modules: dict, state: dict | None = None):
        """Record a finished step; write a checkpoint every save_every steps and at the end."""
        if self.rank != 0:
            return
        if self.store is not None and self.id is not None:
            self.store.log_metrics(self.id, step, values)
        if step % self.save_every == 0 or step == max_steps:
            save_checkpoint(self.out, step, optimizer, {**(state or {}), "run_id": self.id, "config": self.config},
                            modules)

    def save(self, write, model: bool = True) -> None:
        """Write the result into OUT (rank 0) with `write(directory)`, keeping OUT's checkpoints;
        a trained model is registered in the app."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.out, prefix=".result-") as tmp:
            write(Path(tmp))
            publish(self.out, Path(tmp))
        self.output = str(self.out)
        if model and self.store is not None:
            register(self.store, self.out)
