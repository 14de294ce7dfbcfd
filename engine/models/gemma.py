"""Gemma 2 and Gemma 3 (text) decoders (Google, 2024-2025).

A Llama-like decoder (rotary positions, grouped-query attention, gated MLP) with Gemma's changes:
- token embeddings scaled by sqrt(hidden_size) (rounded to the model's dtype, as transformers does);
- a GeGLU MLP (tanh-approximated GELU on the gate);
- RMSNorms that multiply by (1 + weight), so a zero weight is the identity, before *and* after
  both attention and the MLP (the post-norms apply to the branch, before the residual sum);
- attention scores scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
- layers alternating between a sliding window of `sliding_window` tokens and global attention
  (`layer_types`; by default Gemma 2 alternates, Gemma 3 has five sliding layers to one global);
- Gemma 2 soft-caps attention scores and final logits: cap * tanh(x / cap);
- Gemma 3 normalises each query and key head (RMSNorm, before RoPE), turns its sliding layers
  with their own rotary base (rope_local_base_freq) and applies rope_scaling to global layers only.

One KV cache serves every layer: it keeps all positions, and a sliding layer masks those
outside its window (KVCache.mask), so decoding past the window sees what a full pass sees.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ParleyError
from engine.models import patterns, rope
from engine.models.attention import attention
from engine.models.cache import KVCache, positions_and_mask
from engine.models.linear import Linear, fused_linear, widen

MODEL_TYPES = ("gemma2", "gemma3_text")
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class GemmaConfig:
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0           # global layers
    rope_local_theta: float = 10000.0     # sliding layers (Gemma 3's rope_local_base_freq)
    rope_scaling: dict | None = None      # global layers only
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096     # None where no layer slides
    layer_types: tuple[str, ...] = ()
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    model_type: str = "gemma2"

    @classmethod
    def from_hf(cls, hf: dict) -> "GemmaConfig":
        model_type = hf["model_type"]
        gemma3 = model_type == "gemma3_text"
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ParleyError(f"config.json: hidden_activation {act!r} is not supported for {model_type}: "
                              "only 'gelu_pytorch_tanh' (GeGLU) is")
        if hf.get("use_bidirectional_attention"):
            raise ParleyError(f"config.json: {model_type} with use_bidirectional_attention=true is not supported: "
                              "Parley runs causal decoders only")
        layers = hf["num_hidden_layers"]
        every = hf.get("sliding_window_pattern", 6) if gemma3 else 2   # every n-th layer is global
        if not isinstance(every, int) or every < 1:
            raise ParleyError(f"config.json: sliding_window_pattern must be a positive integer (it is {every!r})")
        layer_types = tuple(hf.get("layer_types") or [SLIDING if (i + 1) % every else FULL for i in range(layers)])
        if len(layer_types) != layers or not set(layer_types) <= {SLIDING, FULL}:
            raise ParleyError(f"config.json: layer_types must list {SLIDING!r} or {FULL!r} for each of the "
                              f"{layers} layers")
        window = hf.get("sliding_window", 4096) if SLIDING in layer_types else None
        if SLIDING in layer_types and (not isinstance(window, int) or window < 1):
            raise ParleyError(f"config.json: sliding_window must be a positive integer (it is {window!r})")
        # Transformers 5 writes rope_parameters (per layer type for Gemma 3); older checkpoints
        # write rope_theta, rope_scaling and Gemma 3's rope_local_base_freq.
        params = dict(hf.get("rope_parameters") or {})
        full = dict(params.get(FULL) or (params if not gemma3 else {}))
        local = dict(params.get(SLIDING) or {})
        theta = full.pop("rope_theta", hf.get("rope_theta", 1e6 if gemma3 else 10000.0))
        local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)) if gemma3 else theta
        scaling = hf.get("rope_scaling") or full or None
        if rope.rope_type(scaling) == "default":
            scaling = None
        if rope.rope_type(scaling) == "longrope":
            raise ParleyError(f"config.json: longrope scaling is not supported for {model_type}: "
                              "Parley reads it for Phi-3 and the Llama family")
        if local.get("rope_type", "default") != "default":
            raise ParleyError(f"config.json: rope scaling of {model_type}'s sliding layers is not supported: "
                              "set rope_parameters.sliding_attention.rope_type to 'default'")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 8192), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_local_theta=local_theta, rope_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", True), attention_bias=hf.get("attention_bias", False),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256), sliding_window=window,
            layer_types=layer_types,
            # transformers' Gemma 3 reads attn_logit_softcapping but never applies it; nor does Parley
            attn_logit_softcapping=None if gemma3 else hf.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=hf.get("final_logit_softcapping", None if gemma3 else 30.0),
            model_type=model_type,
        )

    def to_hf(self) -> dict:
        """A config.json that transformers reads as the same model."""
        hf = dict(
            model_type=self.model_type, architectures=[ARCHITECTURES[self.model_type]], vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling, tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias, query_pre_attn_scalar=self.query_pre_attn_scalar,
            sliding_window=self.sliding_window, layer_types=list(self.layer_types),
            attn_logit_softcapping=self.attn_logit_softcapping, final_logit_softcapping=self.final_logit_softcapping,
            hidden_activation="gelu_pytorch_tanh",
        )
        if self.model_type == "gemma3_text":
            hf["rope_local_base_freq"] = self.rope_local_theta
        return hf


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1, and the product is taken in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return (F.rms_norm(x.float(), x.shape[-1:], eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: GemmaConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, c.num_attention_heads, c.num_key_value_heads
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.qk_norm = c.model_type == "gemma3_text"
        if self.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.scale, self.softcap = c.query_pre_attn_scalar ** -0.5, c.attn_logit_softcapping

    def forward(self, x, cos, sin, mask, cache):
        B, T = cache.batch if cache is not None else x.shape[0], x.shape[1]   # x may be widened (linear.py)
        H, KV = self.n_heads, self.n_kv_heads
        qkv = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)[:B].view(B, T, H + 2 * KV, -1).transpose(1, 2)
        qk = qkv[:, :H + KV]
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), dim=1)
        qk = rope.apply(qk, cos, sin)   # query and key heads turn alike: one rotation
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV:]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.o_proj(attention(q, k, v, mask, self.scale, self.softcap))


class MLP(nn.Module):
    def __init__(self, c: GemmaConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        gate, up = fused_linear(x, self.gate_proj, self.up_proj).split(self.up_proj.out_features, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    def __init__(self, c: GemmaConfig, layer: int):
        super().__init__()
        self.kind = c.layer_types[layer]
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.sliding = patterns.rule("local", window=config.sliding_window) if config.sliding_window else None
        # Made on the CPU even when the model is built on the meta device; .to(device) moves them.
        self.register_buffer("inv_freq", rope.inv_frequencies(config.head_dim, config.rope_theta,
                                                               config.rope_scaling), persistent=False)
        self.register_buffer("local_inv_freq", rope.inv_frequencies(config.head_dim, config.rope_local_theta, None),
                             persistent=False)
        # float32, rounded to the model's dtype where it is used, as transformers does
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5, device="cpu"), persistent=False)
        self.tie_weights()

    @property
    def tied_keys(self) -> list[str]:
        return ["lm_head.weight"] if self.config.tie_word_embeddings else []

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_len,
                       self.lm_head.weight.dtype, self.lm_head.weight.device)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, pad_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [batch, seq, vocab] (or [batch, 1, vocab] with last_only) for token ids [batch, seq]."""
        x = self.hidden_states(idx, cache, pad_mask)
        logits = self.lm_head(x[:, -1:] if last_only else x)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states [batch, seq, hidden] (what lm_head and reward heads read)."""
        if cache is None:
            positions, full = positions_and_mask(pad_mask, idx.shape[1], idx.device)
            _, local = positions_and_mask(pad_mask, idx.shape[1], idx.device, self.sliding)
        else:   # the cache's own pattern is dense; sliding layers ask for theirs
            positions, full = cache.step(idx.shape[1], pad_mask)
            local = cache.mask(self.sliding)
        x = self.model.embed_tokens(idx) * self.embed_scale.to(self.model.embed_tokens.weight.dtype)
        masks = {FULL: full, SLIDING: local}
        turns = {FULL: rope.cos_sin(self.inv_freq, positions, x.dtype),
                 SLIDING: rope.cos_sin(self.local_inv_freq, positions, x.dtype)}
        if cache is not None:
            x = widen(x, self.lm_head)
        for block in self.model.layers:
            x = block(x, *turns[block.kind], masks[block.kind], cache)
        return self.model.norm(x[:len(idx)])


def state_from_hf(tensors: dict) -> dict:
    return {name: t for name, t in tensors.items() if not name.endswith("inv_freq")}


def state_to_hf(state: dict) -> dict:
    return state


Config, Model = GemmaConfig, Gemma
