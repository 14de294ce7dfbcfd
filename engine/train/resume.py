"""Checkpoints a training run resumes from, shared by every `parley train` mode.

OUT/checkpoints/step-N holds the trained weights, the optimizer's state and the RNG state in
safetensors (never pickled) and the rest of the run's state in JSON. Each checkpoint is written
atomically and the last two are kept, so a crash at any moment leaves one whole checkpoint; a
damaged newest one gives an error that names the previous one.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.errors import ParleyError
from engine.files import atomic_dir, claim_output_dir, write_json

STATE = "trainer_state"


def checkpoints(out: str | Path) -> list[Path]:
    return sorted((Path(out) / "checkpoints").glob("step-*"))


def save_checkpoint(out: str | Path, step: int, optimizer, state: dict, modules: dict | None = None,
                    lm=None) -> None:
    """`modules` (name: nn.Module) are stored as tensors; `lm` as a whole model directory."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for name, module in (modules or {}).items():
        for key, value in module.state_dict().items():
            # copies: tied weights share memory, which safetensors refuses to write twice
            tensors[f"module.{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    opt = optimizer.state_dict()
    for index, values in opt["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().to("cpu", copy=True).contiguous()
    try:
        with atomic_dir(claim_output_dir(out) / "checkpoints" / f"step-{step:06d}") as tmp:
            if lm is not None:
                lm.write(tmp)
            save_file(tensors, str(tmp / f"{STATE}.safetensors"))
            write_json(tmp / f"{STATE}.json", {**state, "step": step, "param_groups": opt["param_groups"]})
    except (OSError, SafetensorError) as e:   # a full disk, most often; the half-written checkpoint is gone
        previous = "--resume goes on from the one before" if checkpoints(out) else "then start again"
        raise ParleyError(f"could not write the checkpoint of step {step} in {Path(out) / 'checkpoints'} ({e}): "
                          f"free some space; {previous}") from None
    for old in checkpoints(out)[:-2]:
        shutil.rmtree(old)


def newest_checkpoint(out: str | Path, read):
    """`read(directory)` of the newest checkpoint, or a clear error if there is none or it is damaged."""
    found = checkpoints(out)
    if not found:
        raise ParleyError(f"--resume found no checkpoint in {Path(out) / 'checkpoints'}: start without --resume")
    try:
        return read(found[-1])
    except (ParleyError, SafetensorError, OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
        previous = f"delete it to resume from {found[-2].name}" if len(found) > 1 else "start again without --resume"
        raise ParleyError(f"checkpoint {found[-1]} is damaged ({e}): {previous}") from None


def read_state(directory: Path, modules: dict | None = None) -> tuple[dict, dict]:
    """(JSON state, tensors) of one checkpoint, with the weights of `modules` loaded in place."""
    state = json.loads((directory / f"{STATE}.json").read_text())
    tensors = load_file(directory / f"{STATE}.safetensors")
    for name, module in (modules or {}).items():
        prefix = f"module.{name}."
        saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        own = module.state_dict()
        if saved.keys() != own.keys() or any(saved[k].shape != own[k].shape for k in own):
            raise ParleyError(f"its {name} is not this run's model: resume with the options the run started with")
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(saved[key])
    return state, tensors


def restore(optimizer, state: dict, tensors: dict, device) -> None:
    """Put the optimizer and the random number generators back where the checkpoint left them."""
    opt_state = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            opt_state.setdefault(int(index), {})[key] = value.to(device) if key != "step" else value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
