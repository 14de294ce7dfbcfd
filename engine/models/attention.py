"""Scaled dot-product attention for the Transformer decoders, batch-invariant when decoding on the CPU.

PyTorch's CPU flash-attention kernel shares out its work between threads by batch size, so with
two or more threads a row's output depends on how many rows are in the batch: a candidate's
tokens would change when another candidate runs beside it. A decoding step (one query per row)
on the CPU therefore runs as plain batched products, which treat every (row, head) alike; they
are tiny next to the weight products. They run in the cache's dtype, float32 on the CPU (see
cache.py); softmax runs in float32 anyway, as in transformers' eager attention.
"""
import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [batch, heads, queries, dim] over k, v [batch, kv_heads, keys, dim]; `mask` [batch, 1,
    queries, keys] is True where attention is allowed. No mask means causal (or one query that
    sees every key). Query heads share kv heads in groups (grouped-query attention). `scale`
    multiplies the scores (1/sqrt(dim) by default); `softcap` bounds them to (-softcap, softcap)
    by softcap * tanh(score / softcap) before the mask (Gemma 2), which SDPA cannot do.
    Returns [batch, queries, heads * dim], the heads side by side for the output projection."""
    B, H, T, D = q.shape
    if softcap is None and (q.device.type != "cpu" or T != 1 or torch.is_grad_enabled()):
        k, v = k.to(q.dtype), v.to(q.dtype)   # the KV cache on the CPU is float32 whatever the model
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=k.shape[1] != H, scale=scale)
        return y.transpose(1, 2).reshape(B, T, H * D)
    # [batch * kv_heads, group * queries, dim] against [batch * kv_heads, keys, dim]: bmm on views
    kv_heads, keys = k.shape[1], k.shape[2]
    group = H // kv_heads
    scores = torch.bmm(q.to(k.dtype).reshape(B * kv_heads, group * T, D),
                       k.reshape(B * kv_heads, keys, D).transpose(1, 2)) * (D ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None and T > 1:
        mask = torch.ones(T, keys, dtype=torch.bool, device=q.device).tril(keys - T)[None, None]
    if mask is not None:
        scores = scores.view(B, H, T, keys).masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    y = torch.bmm(weights.view(B * kv_heads, group * T, keys), v.reshape(B * kv_heads, keys, D))
    return y.view(B, H, T, D).transpose(1, 2).reshape(B, T, H * D).to(q.dtype)
