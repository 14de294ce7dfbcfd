"""Rotary position embeddings (Su et al. 2021) in the Hugging Face layout (halves, not interleaved)."""
import math

import torch

from engine.errors import ParleyError

ROPE_TYPES = ("default", "linear", "llama3")


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, float32 on the CPU, with linear or Llama-3 context scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        # Between the two cut-offs, interpolate smoothly between scaled and unscaled frequencies.
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ParleyError(f"config.json: rope scaling type {rope_type!r} is not supported: "
                      f"use one of {', '.join(ROPE_TYPES)}")


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin [batch, 1, seq, head_dim] for position ids [batch, seq], computed in float32.

    The first half of sin is negated: rotating (x1, x2) is x * cos + (x2, x1) * (-sin, sin), so
    `apply` is a roll, two products and a sum, not two slices, a negation and a concatenation too."""
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    sin = angles.sin()
    sin[..., :inv_freq.shape[0]] *= -1
    return angles.cos().to(dtype), sin.to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
