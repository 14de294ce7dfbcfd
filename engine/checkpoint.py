"""Reading and writing Hugging Face-format model directories: config.json and safetensors.

Weights are only ever read from safetensors; pickled `.bin` files are refused, never loaded.
"""
import json
from pathlib import Path, PurePosixPath, PureWindowsPath

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
    if path.is_file():
        raise ParleyError(f"{path} is a file, not a model directory: pass the directory that holds config.json, "
                          "model.safetensors and tokenizer.json")
    if not path.is_dir():
        raise ParleyError(f"model directory {path} does not exist: pass a directory that holds config.json, "
                          "model.safetensors and tokenizer.json")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files that hold a model's weights, or a clear refusal."""
    if (path / INDEX).is_file():
        index = read_json(path / INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ParleyError(f"{path / INDEX} has no weight_map: re-save the model")
        shards = sorted(set(map(str, weight_map.values())))
        for shard in shards:
            _check_shard_name(path / INDEX, shard)
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


def _check_shard_name(index: Path, shard: str) -> None:
    """A shard must be a file of the model directory: an index may not point anywhere else on disk.

    The name is checked as written rather than resolved, because a Hugging Face cache snapshot's
    files are symlinks into its blobs folder, outside the snapshot directory, and those are fine.
    """
    parts = PurePosixPath(shard.replace("\\", "/")).parts
    if not parts or shard.startswith(("/", "\\")) or PureWindowsPath(shard).drive or ".." in parts:
        raise ParleyError(f"{index} names shard {shard!r}, outside the model directory: shards must be files "
                          "of the model directory itself; fix the weight_map or re-save the model")


def read_tensors(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, cast to `dtype` (floating ones only) on `device`.

    A weight that is NaN or infinite is refused here, naming it: such a model would only ever
    generate garbage, and finding out mid-reply is worse (one isfinite pass per tensor, on `device`).
    """
    tensors = {}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if t.is_floating_point():
                        cast = t.to(device, dtype)
                        if not torch.isfinite(cast).all():
                            _refuse_non_finite(file, name, t, dtype)
                        tensors[name] = cast
                    else:
                        tensors[name] = t.to(device)
        except (SafetensorError, OSError) as e:
            raise ParleyError(f"{file} is not a readable safetensors file ({e}): re-download or re-save it") from None
    return tensors


def _refuse_non_finite(file: Path, name: str, original: torch.Tensor, dtype: torch.dtype) -> None:
    if torch.isfinite(original).all():   # finite as stored: the values overflow the dtype they were cast to
        raise ParleyError(f"{file}: tensor {name!r} has values too large for {str(dtype).removeprefix('torch.')}: "
                          "load the model with --dtype float32 or bfloat16")
    raise ParleyError(f"{file}: tensor {name!r} holds NaN or infinite values: the weights are corrupt "
                      "(a diverged training run or a damaged download); use another checkpoint")


def check_tensors(file: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Refuse tensors whose names, shapes or kinds do not fit the model that config.json describes.

    `expected` holds the model's own tensors (on the meta device): their shapes, and whether each
    is floating point. An integer or boolean tensor where a weight belongs is refused by name.
    (The reward model still passes bare shapes, which skip the kind check.)
    """
    shapes = {name: getattr(e, "shape", e) for name, e in expected.items()}
    for name in sorted(found):
        if name not in expected:
            raise ParleyError(f"{file}: tensor {name!r} is not part of the model that config.json describes: "
                              "check that config.json belongs to these weights")
        if found[name].shape != shapes[name]:
            raise ParleyError(f"{file}: tensor {name!r} has shape {list(found[name].shape)} but config.json implies "
                              f"{list(shapes[name])}: check that config.json belongs to these weights")
        weight = isinstance(expected[name], torch.Tensor) and expected[name].is_floating_point()
        if weight and not found[name].is_floating_point():
            raise ParleyError(f"{file}: tensor {name!r} has dtype {str(found[name].dtype).removeprefix('torch.')}, "
                              "but a weight must be floating point (float32, float16 or bfloat16): "
                              "the file is damaged or was not written as model weights; re-save the model")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ParleyError(f"{file}: tensor {missing[0]!r} is missing ({len(missing)} missing in all): "
                          "the weights are incomplete or belong to another model")


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(path / SINGLE),
              metadata={"format": "pt"})
