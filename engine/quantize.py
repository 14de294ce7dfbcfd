"""A model loaded only to decode: its weights in their decoding form alone, float or int8.

On the CPU a model decodes from a copy of its weights packed for oneDNN (engine/models/linear.py),
which a model that trains keeps beside the plain weights, so a decoding model would hold every
weight twice. `prepare(lm, quantize)` (what `engine.load(..., decode_only=True)` runs) makes each
layer's decoding form once and drops its plain weight. The output head keeps its plain weight
beside its packed one (it is the embedding in tied models, and the model's device, dtype and KV
cache are read from it): measured here, a float head read by F.linear takes 2-3x as long per step
as its packed copy (MKL's one-row product), so the copy earns its place. The plain weight stays
on disk, mapped, where the checkpoint holds it as it is used (`_map_lazily`).

`quantize="int8"` makes that form int8 weights with one scale per output channel (symmetric,
scale = max |w| / 127 of each row, weight-only: activations stay floating point), multiplied by
torch's own CPU kernel `aten._weight_int8pack_mm`, a quarter of float32's bytes to read per token.
That kernel needs the inner dimension to be a multiple of 16; a layer where it is not stays packed
float (none in the usual shapes).

A prepared model decodes and scores as before (prefill and eval take the same path); gradients,
saving, LoRA and merging are refused with one line (the weights they need are gone).
"""
import copy
import ctypes
import mmap

import torch

from engine.errors import ParleyError

QUANTIZE = ("int8",)     # what --quantize takes
INT8_BLOCK = 16          # _weight_int8pack_mm's inner dimension must be a multiple of this


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [out, in], bfloat16 scales [out]) with weight ≈ int8 * scale per row.

    The scales are rounded to bfloat16 first (the kernel's dtype), and the rows divided by that
    rounded scale, so that q * scale is the closest int8 multiple of the scale the kernel uses."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def check(quantize: str | None, device: torch.device, flag: str = "--quantize") -> None:
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ParleyError(f"{flag} {quantize!r} is not known: use {' or '.join(QUANTIZE)}, or leave it out")
    if device.type != "cpu":
        raise ParleyError(f"{flag} {quantize} runs on the CPU only (torch's int8 weight-only kernel): "
                          f"leave it out on {device.type}, or pass --device cpu")


def prepare(lm, quantize: str | None = None):
    """Turn `lm` (just loaded) into a model that only decodes, as the module docstring says."""
    from engine.models.linear import Linear, PackedWeight, _onednn_decodes
    check(quantize, lm.device)
    layers = [(name, m) for name, m in lm.model.named_modules() if isinstance(m, Linear)]
    if not layers:
        return lm   # a family without Linear layers (n-grams)
    with torch.no_grad():
        packs = _onednn_decodes(torch.zeros(1, 1, dtype=lm.dtype, device=lm.device), lm.dtype)
    if quantize is None and not packs:
        return lm   # nothing to pack here (a GPU, or a dtype oneDNN lacks): the plain weights decode
    for name, layer in layers:
        if not isinstance(layer.packed, PackedWeight):
            continue
        int8 = quantize == "int8" and layer.in_features % INT8_BLOCK == 0
        layer.packed.form = "int8" if int8 else "packed" if packs else None
        layer.packed.drop_plain = layer.packed.form is not None and layer is not lm.model.lm_head
    _decode_once(lm)
    head = lm.model.lm_head.weight
    mapped = _file_mapping(head)
    # the head is not copied where it can be mapped afresh: it would be copied only to be dropped
    _own_copies(lm.model, but=head if mapped is not None else None)
    if mapped is not None and not _map_lazily(head, *mapped):
        with torch.no_grad():
            head.data = head.data.clone()
    _return_freed_memory()
    lm.quantize = quantize
    return lm


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system. Loading reads every weight in float32 and
    packing makes a second copy before the first goes: glibc keeps those freed buffers in its heap,
    and the process would stay ~100 MiB above what the model holds (gpt2-124M: 719 against 619 MiB)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc (macOS, Windows, musl): its allocator decides
        pass


def _file_mapping(t: torch.Tensor) -> tuple[str, int] | None:
    """(file, byte offset) where `t` is a view of a file's memory map (safetensors maps a checkpoint),
    found in Linux's /proc/self/maps (no library reads it); None elsewhere or for other memory."""
    if not t.is_contiguous() or t.is_meta or t.device.type != "cpu":
        return None
    start_of = t.data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].startswith("/") or fields[5].rstrip().endswith("(deleted)"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= start_of and start_of + t.nbytes <= end:
                    return fields[5].rstrip("\n"), int(fields[2], 16) + start_of - start
    except (OSError, ValueError):
        pass
    return None


def _map_lazily(weight: torch.nn.Parameter, path: str, offset: int) -> bool:
    """The output head's plain weight (the embedding, in tied models) becomes a fresh private map of
    its bytes in the checkpoint, none of them in memory until read: decoding looks up a few rows of
    the embedding and multiplies by the packed copy, so the rest stay on disk (as transformers'
    mapped weights do) instead of a second copy in memory. Checked equal to what was loaded first;
    returns whether it was mapped."""
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:   # copy-on-write: nothing ever writes to the file
            m = mmap.mmap(f.fileno(), offset - aligned + weight.nbytes, access=mmap.ACCESS_COPY, offset=aligned)
    except (OSError, ValueError):
        return False
    view = torch.frombuffer(m, dtype=weight.dtype, count=weight.numel(), offset=offset - aligned).view(weight.shape)
    with torch.no_grad():
        same = torch.equal(view.view(torch.uint8), weight.detach().view(torch.uint8))
    if not same:   # the loader changed it in memory: keep what it loaded
        return False
    if hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED)   # the comparison read every page: give them back
    weight.data = view
    return True


def _own_copies(model, but: torch.Tensor | None = None) -> None:
    """The weights still held (all `but` one) become copies of their own. Read from a checkpoint,
    every tensor is a view of the file's memory map (safetensors maps it), and the map stays resident
    while any view lives: the embedding and the norms would keep the dropped weights' pages in memory."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_meta and p is not but:
                p.data = p.data.clone()


def decoding_copy(lm, quantize: str | None):
    """A model that only decodes, made from `lm` as it is now (a model in training: its LoRA
    adapters folded into the copy's weights), `lm` itself untouched: what the online trainers draw
    each step's rollouts from with --rollout-quantize (engine/rlhf/rollout.py)."""
    from engine import lora
    from engine.lm import LM
    with torch.no_grad():
        model = copy.deepcopy(lm.model)
        if lora.adapted_layers(model):
            lora.merge(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return prepare(LM(model, lm.tokenizer, lm.config, lm.generation_config, lm.path), quantize)


def _decode_once(lm) -> None:
    """One token through the model with a cache: each layer group makes its decoding form now, as
    the model's own code groups the layers (q/k/v and gate/up as one product), and drops its plain
    weights; then a layer no decoding step reached (a head of another use) is made on its own."""
    from engine.models.linear import PackedWeight, fused_linear
    model = lm.model
    with torch.inference_mode():
        ids = torch.zeros(1, 1, dtype=torch.long, device=lm.device)
        new_cache = getattr(model, "new_cache", None)
        model(ids, cache=new_cache(1, 1)) if new_cache is not None else model(ids)
        for m in model.modules():
            packed = getattr(m, "packed", None)
            if isinstance(packed, PackedWeight) and packed.form is not None and packed.key != "made" \
                    and not m._parameters["weight"].is_meta:
                fused_linear(torch.zeros(1, m.in_features, dtype=lm.dtype, device=lm.device), m)


def refuse_if_prepared(lm, what: str) -> None:
    """One line instead of a failure deep inside: `what` needs the plain weights, which are gone."""
    if any(p.is_meta for p in lm.model.parameters()):
        raise ParleyError(f"cannot {what}: this model was loaded only to decode, its plain weights dropped"
                          + (" and the rest quantized to int8" if getattr(lm, "quantize", None) else "")
                          + "; load it with engine.load(path) (no --quantize) to do that")
