"""LoRA adapters (Hu et al. 2021) for every trainer, saved in PEFT's format.

A targeted layer keeps its frozen weight W and gains two small trained matrices, A [r, in] and
B [out, r] (B starts at zero, so training starts from the base): it computes with
W + (alpha / r) B A. Only A and B train, so gradients and optimizer state hold only them.

Written by hand, with peft only in the test extras as the reference (tests/test_lora.py loads
what this module saves with `peft.PeftModel.from_pretrained` and compares logits), because:
- peft's LoraLayer wraps a layer and adds its low-rank path in its own forward, but Parley's
  blocks read the weights of q/k/v and of gate/up directly, to run each group as one product
  (engine/models/linear.py fused_linear), which an injected peft layer does not fit (tried with
  peft 0.21.2: on q/k/v or gate/up, fused_linear fails, the layer has no `packed`; on o_proj or
  down_proj it works, but only because those are called as modules).
  Here the adapted layer's `weight` itself is W + scale B A, so every path, fused or not, packed
  for decoding or not, computes with the adapted weight;
- peft pulls transformers and accelerate into the app, which otherwise never imports them.
The cost of adapting the weight rather than adding x A^T B^T: training keeps one composed weight
per adapted layer for the backward pass (still no gradients or Adam state for W).

- `add(lm, base, r, alpha, targets)`: a trainable adapter on a loaded model (an `AdapterLM`,
  whose `write` saves the adapter directory);
- `load(dir)`: an adapter directory as a model: its base (adapter_config.json's
  base_model_name_or_path, resolved as every model name is) with the adapter merged into the
  weights (W + scale B A, so decoding runs the unchanged fast path), or kept apart for training;
- `disabled(model)` and `Reference(model)`: the base, with the adapter off, as the frozen
  reference of DPO, PPO, RLOO and GRPO: one copy of the weights for policy and reference;
- `merge(model)`: fold the adapters into the weights and drop them (`parley merge`).

The directory: adapter_config.json (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
target_modules, base_model_name_or_path) and adapter_model.safetensors with PEFT's names,
base_model.model.<the base's Hugging Face module path>.lora_A.weight / .lora_B.weight.
"""
import contextlib
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine import checkpoint
from engine.errors import ParleyError
from engine.files import write_json
from engine.lm import LM
from engine.models import family
from engine.models.linear import Linear, PackedWeight

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


class LoRALinear(Linear):
    """A Linear with an adapter. Made from an existing layer by `add` (its class is swapped, so
    the model keeps its structure and its state_dict keeps the base's names), never built."""

    @property
    def weight(self) -> torch.Tensor:
        w = self._parameters["weight"]
        if not self.lora_enabled:
            return w
        if torch.is_grad_enabled():   # training: the composed weight, through which A and B learn
            return w + self.lora_scale * (self.lora_B @ self.lora_A)
        # decoding: composed once per change of W, A or B (an optimizer step bumps their versions)
        a, b = self._parameters["lora_A"], self._parameters["lora_B"]
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in (w, a, b))
        if self.lora_cache[0] != key:
            self.lora_cache = (key, (w + self.lora_scale * (b @ a)).detach())
        return self.lora_cache[1]


def adapted_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def default_targets(model: nn.Module) -> list[str]:
    """Every Linear layer's short name except the output head (tied to the embeddings in most
    models): all of a block's projections, as QLoRA adapts."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - {"lm_head", "score"})


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a list of names matches a module whose name is one of them or ends with
    "." + one; a string is a regular expression the whole name must match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def attach(model: nn.Module, r: int, alpha: float, targets, rslora: bool = False) -> dict[str, LoRALinear]:
    """Give every Linear layer that `targets` names an adapter (A random as PEFT's, B zero)."""
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name and _matches(name, targets) and not name.endswith("lm_head")}
    if not found:
        raise ParleyError(f"--lora-targets {','.join(targets) if isinstance(targets, list) else targets} names no "
                          f"layer of this model: use some of {','.join(default_targets(model))}")
    for layer in found.values():
        w = layer._parameters["weight"]
        a = nn.Parameter(torch.empty(r, layer.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))   # PEFT's default init of lora_A
        b = nn.Parameter(torch.zeros(layer.out_features, r, device=w.device, dtype=w.dtype))
        layer.__class__ = LoRALinear
        layer.register_parameter("lora_A", a)
        layer.register_parameter("lora_B", b)
        if not isinstance(getattr(layer, "packed", None), PackedWeight):
            layer.packed = PackedWeight()
        layer.lora_scale = alpha / math.sqrt(r) if rslora else alpha / r
        layer.lora_enabled, layer.lora_cache = True, (None, None)
    return found


def _invalidate_packed(model: nn.Module) -> None:
    # The packed decoding weights are keyed on parameter versions, which switching the adapter
    # on or off does not change: forget them, so that they are packed again as they now are.
    for m in model.modules():
        if isinstance(getattr(m, "packed", None), PackedWeight) and m.packed.form is None:   # not a decode-only form
            m.packed.key = None


@contextlib.contextmanager
def disabled(model: nn.Module):
    """The base model, inside this block: every adapter of `model` off."""
    layers = adapted_layers(model).values()
    for layer in layers:
        layer.lora_enabled = False
    _invalidate_packed(model)
    try:
        yield model
    finally:
        for layer in layers:
            layer.lora_enabled = True
        _invalidate_packed(model)


class Reference(nn.Module):
    """The frozen reference policy of a LoRA run: the policy's own module with its adapter off,
    so policy and reference hold one copy of the weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.policy = model

    def forward(self, *args, **kwargs):
        with torch.no_grad(), disabled(self.policy):
            return self.policy(*args, **kwargs)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + scale B A) and turn the layers back into plain
    Linears: the model decodes at full speed, exactly as a model without adapters."""
    for layer in adapted_layers(model).values():
        with torch.no_grad():
            w = layer._parameters["weight"]
            w.add_(layer.lora_scale * (layer.lora_B @ layer.lora_A).to(w.dtype))
        for name in ("lora_A", "lora_B"):
            del layer._parameters[name]
        for name in ("lora_scale", "lora_enabled", "lora_cache"):
            delattr(layer, name)
        layer.__class__ = Linear
    _invalidate_packed(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """Only the adapters train."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))


class Trained:
    """What a LoRA run's checkpoints hold of `module` (engine.train.resume reads and writes its
    state_dict): its trained parameters only (the adapters, a reward model's head)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}


def checkpointed(module: nn.Module) -> nn.Module:
    """`module` as a run's checkpoints keep it: whole, or with adapters only what trains."""
    return Trained(module) if adapted_layers(module) else module


def trainable(module: nn.Module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


# -- the directory -------------------------------------------------------------------------------------
class AdapterLM(LM):
    """A model with a trainable adapter; `write` saves the adapter directory."""

    def __init__(self, lm: LM, base: str, r: int, alpha: float, rslora: bool = False):
        super().__init__(lm.model, lm.tokenizer, lm.config, lm.generation_config, lm.path)
        self.base, self.r, self.alpha, self.rslora = base, r, alpha, rslora

    def write(self, directory: Path) -> None:
        layers = adapted_layers(self.model)
        names = hf_names(self.model, self.config["model_type"], layers)
        tensors = {}
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                tensors[f"{PREFIX}{names[name]}.{part}.weight"] = layer._parameters[part].detach().to(
                    "cpu", copy=True).contiguous()
        save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
        write_json(directory / CONFIG, {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": self.rslora,
            "use_dora": False, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
            # Hugging Face's GPT-2 keeps its projections as Conv1D, [in, out]: PEFT transposes the update
            "fan_in_fan_out": self.config["model_type"] == "gpt2", "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
            "revision": None})


def hf_names(model: nn.Module, model_type: str, layers) -> dict[str, str]:
    """Each adapted layer's module path in the base's Hugging Face checkpoint (the family's
    state_to_hf mapping of its weight's name)."""
    fam = family(model_type)
    out = {}
    for name, layer in layers.items():
        [hf] = fam.state_to_hf({f"{name}.weight": layer._parameters["weight"]})
        out[name] = hf.removesuffix(".weight")
    return out


def base_name(name: str) -> str:
    """What adapter_config.json calls the base: a known model's name, else its absolute path."""
    from engine.registry import resolve_model
    return name if not Path(name).expanduser().is_dir() else str(resolve_model(name).resolve())


def add(lm: LM, base: str, r: int, alpha: float | None = None, targets: str | None = None) -> AdapterLM:
    """A trainable adapter (rank r, scale alpha / r, on the layers `targets` names: comma-separated
    short names, default every projection) on `lm`, whose base was loaded from `base`."""
    from engine.quantize import refuse_if_prepared
    refuse_if_prepared(lm, "add a LoRA adapter")
    if lm.config.get("model_type") == "ngram":
        raise ParleyError("an n-gram model has no layers to adapt: drop --lora-r")
    alpha = float(alpha if alpha is not None else 2 * r)
    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else default_targets(lm.model)
    attach(lm.model, r, alpha, names)
    freeze_base(lm.model)
    return AdapterLM(lm, base_name(base), r, alpha)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_config(path: Path) -> dict:
    """adapter_config.json, with one line for what Parley cannot apply."""
    c = checkpoint.read_json(path / CONFIG)
    file, fix = path / CONFIG, "fix adapter_config.json or re-save the adapter"
    if c.get("peft_type") != "LORA":
        raise ParleyError(f"{file}: peft_type {c.get('peft_type')!r} is not supported: Parley loads LoRA adapters")
    r, alpha = c.get("r"), c.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ParleyError(f"{file}: r is {r!r}, but it must be a whole number, 1 or more: {fix}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ParleyError(f"{file}: lora_alpha is {alpha!r}, but it must be a finite number: {fix}")
    for key, off in (("use_dora", False), ("bias", "none"), ("modules_to_save", None), ("rank_pattern", {}),
                     ("alpha_pattern", {}), ("layers_to_transform", None)):
        if c.get(key, off) not in (off, None, [], {}):
            raise ParleyError(f"{file}: {key} {c[key]!r} is not supported: Parley applies plain LoRA adapters "
                              f"({key} {off!r})")
    targets = c.get("target_modules")
    if not targets or not (isinstance(targets, str) or all(isinstance(t, str) for t in targets)
                           and isinstance(targets, list)):
        raise ParleyError(f"{file}: target_modules must name the adapted layers (a list of names): {fix}")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            raise ParleyError(f"{file}: target_modules {targets!r} is not a regular expression ({e}): {fix}") from None
    if not isinstance(c.get("base_model_name_or_path"), str):
        raise ParleyError(f"{file}: base_model_name_or_path must name the base model: {fix}")
    return c


def load(path: str | Path, device=None, dtype=None, merge_weights: bool = True) -> LM:
    """An adapter directory as a model: its base with the adapter applied; merged into the
    weights (an LM like any other) or, for training, kept apart (an AdapterLM)."""
    import engine
    from engine.registry import resolve_model
    path = Path(path)
    c = read_config(path)
    try:
        base = resolve_model(c["base_model_name_or_path"])
    except ParleyError as e:
        raise ParleyError(f"{path / CONFIG}: its base model is not here ({e}); set base_model_name_or_path "
                          "to the base's directory") from None
    if is_adapter(base):
        raise ParleyError(f"{path / CONFIG}: its base {base} is itself an adapter: merge that one first "
                          "(parley merge) and name the merged model")
    lm = engine.load(base, device=device, dtype=dtype)
    targets = c["target_modules"]
    if targets == "all-linear":
        targets = default_targets(lm.model)
    layers = attach(lm.model, c["r"], c["lora_alpha"], targets, c.get("use_rslora", False))
    names = hf_names(lm.model, lm.config["model_type"], layers)
    try:
        tensors = load_file(path / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise ParleyError(f"{path / WEIGHTS} is missing or not a readable safetensors file ({e}): "
                          "copy the whole adapter directory") from None
    expected = {f"{PREFIX}{names[n]}.{part}.weight": (n, part) for n in layers for part in ("lora_A", "lora_B")}
    for key in tensors:
        if key not in expected:
            raise ParleyError(f"{path / WEIGHTS}: tensor {key!r} is not an adapter of a layer of {base}: "
                              "the adapter belongs to another model")
    with torch.no_grad():
        for key, (name, part) in expected.items():
            if key not in tensors:
                raise ParleyError(f"{path / WEIGHTS}: tensor {key!r} is missing: the adapter is incomplete")
            own, t = layers[name]._parameters[part], tensors[key]
            if t.shape != own.shape:
                raise ParleyError(f"{path / WEIGHTS}: tensor {key!r} has shape {list(t.shape)}, but r {c['r']} and "
                                  f"{base} imply {list(own.shape)}: the adapter belongs to another model")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ParleyError(f"{path / WEIGHTS}: tensor {key!r} is not finite floating point: "
                                  "the adapter is damaged; use another checkpoint")
            own.copy_(t)
    if merge_weights:
        merge(lm.model)
        lm.path = path
        return lm
    freeze_base(lm.model)
    adapter = AdapterLM(lm, c["base_model_name_or_path"], c["r"], c["lora_alpha"], c.get("use_rslora", False))
    adapter.path = path
    return adapter
