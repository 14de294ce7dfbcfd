"""Reading and writing Hugging Face-format model directories: config.json and safetensors.

Weights are only ever read from safetensors; pickled `.bin` files are refused, never loaded.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.errors import ParleyError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise ParleyError(f"{path.parent} has no {path.name}: a model directory needs config.json, "
                              "model.safetensors and tokenizer.json (as transformers' save_pretrained writes them)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParleyError(f"{path} is not valid JSON ({e}): fix or re-save the file") from None
    if not isinstance(data, dict):
        raise ParleyError(f"{path} must hold a JSON object: fix or re-save the file")
    return data


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ParleyError(f"model directory {path} does not exist: pass a directory that holds config.json, "
                          "model.safetensors and tokenizer.json")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files that hold a model's weights, or a clear refusal."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX)
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise ParleyError(f"{path / INDEX} has no weight_map: re-save the model")
        for shard in shards:
            if not (path / shard).is_file():
                raise ParleyError(f"{path / INDEX} names shard {shard!r}, which is missing: copy the whole model")
        return [path / shard for shard in shards]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickled:
        raise ParleyError(
            f"{path} has only pickled PyTorch weights ({', '.join(pickled)}) and Parley never unpickles checkpoints: "
            "convert them once with a tool you trust, e.g. transformers' "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise ParleyError(f"{path} has no {SINGLE} or {INDEX}: a model directory needs its weights in safetensors")


def read_tensors(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, cast to `dtype` (floating ones only) on `device`."""
    tensors = {}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    tensors[name] = t.to(device, dtype if t.is_floating_point() else t.dtype)
        except (SafetensorError, OSError) as e:
            raise ParleyError(f"{file} is not a readable safetensors file ({e}): re-download or re-save it") from None
    return tensors


def check_tensors(file: Path, expected: dict[str, torch.Size], found: dict[str, torch.Tensor]) -> None:
    """Refuse tensors whose names or shapes do not fit the model that config.json describes."""
    for name in sorted(found):
        if name not in expected:
            raise ParleyError(f"{file}: tensor {name!r} is not part of the model that config.json describes: "
                              "check that config.json belongs to these weights")
        if found[name].shape != expected[name]:
            raise ParleyError(f"{file}: tensor {name!r} has shape {list(found[name].shape)} but config.json implies "
                              f"{list(expected[name])}: check that config.json belongs to these weights")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ParleyError(f"{file}: tensor {missing[0]!r} is missing ({len(missing)} missing in all): "
                          "the weights are incomplete or belong to another model")


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(path / SINGLE),
              metadata={"format": "pt"})
