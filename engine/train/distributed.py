"""Data parallelism under torchrun, the same for every trainer: the process group, and sums and
gathers of plain values (figures to log, rollouts to share).

Every process holds the whole model and computes the loss on its share of each batch, weighted
so that the shares add up to the loss of the whole batch; torch's DistributedDataParallel
(engine.train.run.Run.parallel) then combines the gradients. The update is the one a single
process makes on the whole batch (up to float rounding), which the tests check. Without
torchrun, all of this is a no-op.
"""
import os

import torch
import torch.distributed as dist

from engine.device import pick_device


def setup(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun sets RANK and WORLD_SIZE; gloo on CPU, nccl on CUDA."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    chosen = pick_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local)
        torch.cuda.set_device(chosen)
    else:   # the processes share the CPU's cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return rank, world, chosen


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def sum_values(values: list[float], device) -> list[float]:
    """Each number summed over the processes."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(items: list) -> list:
    """Every process's list, concatenated in rank order (Python objects)."""
    if not active():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]
