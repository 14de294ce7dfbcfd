"""Rotary position embeddings (Su et al. 2021) in the Hugging Face layout (halves, not interleaved)."""
import math

import torch

from engine.errors import ParleyError

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_type(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None, long: bool = False) -> torch.Tensor:
    """Inverse frequencies, float32 on the CPU, with linear, Llama-3 or LongRoPE context scaling applied.

    `head_dim` is the part of each head that turns (all of it but for partial rotary). LongRoPE
    (Phi-3.5, Phi-4-mini) has two sets of per-frequency factors: `long` picks the one for sequences
    past the pretraining length (see `longrope_switch`)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "longrope":
        key = "long_factor" if long else "short_factor"
        factors = scaling.get(key)
        if not isinstance(factors, list) or not all(isinstance(f, (int, float)) and f > 0 for f in factors):
            raise ParleyError(f"config.json: longrope needs {key}, a list of positive numbers, and has {factors!r}")
        if len(factors) != len(inv_freq):
            raise ParleyError(f"config.json: longrope's {key} has {len(factors)} "
                              f"numbers, but the rotary dimension needs {len(inv_freq)} (half of {head_dim})")
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device="cpu") * theta ** exponents)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        # Between the two cut-offs, interpolate smoothly between scaled and unscaled frequencies.
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ParleyError(f"config.json: rope scaling type {kind!r} is not supported: "
                      f"use one of {', '.join(ROPE_TYPES)}")


def longrope_switch(scaling: dict | None, max_positions: int, original: int | None) -> tuple[int | None, float]:
    """For LongRoPE: the pretraining length past which the long factors apply, and the scale of cos
    and sin, √(1 + ln s / ln L) for the extension s = max / L unless the config gives it, as
    transformers computes them. (None, 1.0) for every other kind of rotation."""
    if rope_type(scaling) != "longrope":
        return None, 1.0
    original = original or scaling.get("original_max_position_embeddings") or max_positions
    factor = scaling.get("factor") or max_positions / original
    scale = scaling.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return original, scale


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and sin [batch, 1, seq, head_dim] for position ids [batch, seq], computed in float32.

    The first half of sin is negated: rotating (x1, x2) is x * cos + (x2, x1) * (-sin, sin), so
    `apply` is a roll, two products and a sum, not two slices, a negation and a concatenation too."""
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    sin = angles.sin()
    sin[..., :inv_freq.shape[0]] *= -1
    cos = angles.cos()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    turned = cos.shape[-1]
    if turned < x.shape[-1]:   # partial rotary (Phi-4-mini): the rest of each head passes unturned
        return torch.cat((apply(x[..., :turned], cos, sin), x[..., turned:]), dim=-1)
    return x * cos + x.roll(turned // 2, dims=-1) * sin
