"""The Llama family of decoders: Llama 2/3, TinyLlama, SmolLM/SmolLM2/SmolLM3, Qwen2/2.5/3, Mistral
and Phi-3.

Pre-norm blocks with RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP.
Module names follow Hugging Face's, so a checkpoint's tensors load by name with no mapping
(Phi-3 stacks q/k/v and gate/up in one tensor each: engine/models/phi3.py splits them).
The members differ in a few options: biases, Mistral's and Phi-3's sliding window, Qwen3's
RMSNorm of each query and key head before the rotation (`qk_norm`), and SmolLM3's layers
without rotary positions (`nope_layers`, "NoPE": every fourth layer by default).
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

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "smollm3")   # and phi3 (phi3.py)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM", "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM"}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    qkv_bias: bool = False          # Qwen2 always has q/k/v biases
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral's and Phi-3's window; None attends to the whole context
    qk_norm: bool = False              # Qwen3: RMSNorm over each query and key head before RoPE
    nope_layers: tuple[int, ...] = ()  # SmolLM3: layers whose attention has no rotary positions
    partial_rotary_factor: float = 1.0  # Phi-4-mini: the share of each head that rotary positions turn
    original_max_position_embeddings: int | None = None  # Phi-3.5: the pretraining length LongRoPE extends
    model_type: str = "llama"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        model_type = hf["model_type"]
        if hf.get("hidden_act", "silu") != "silu":
            raise ParleyError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported for {model_type}: "
                              "only 'silu' (SwiGLU) is")
        if model_type in ("qwen2", "qwen3", "smollm3") and hf.get("use_sliding_window"):
            raise ParleyError(f"config.json: {model_type} with use_sliding_window=true is not supported: "
                              "set it to false (the released checkpoints ship with false)")
        # Transformers 5 writes rope_parameters; older checkpoints write rope_theta and rope_scaling.
        rope_params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or rope_params or None
        if rope.rope_type(scaling) == "default":
            scaling = None
        partial = hf.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))
        if partial != 1.0 and model_type != "phi3":   # transformers turns part of a head for Phi-3 only
            raise ParleyError(f"config.json: {model_type} with partial_rotary_factor other than 1 is not supported: "
                              "only Phi-3 turns part of each head")
        if not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise ParleyError(f"config.json: partial_rotary_factor is {partial!r}, but it must be a number in (0, 1]")
        layers = hf["num_hidden_layers"]
        nope = ()
        if model_type == "smollm3":   # no_rope_layers[i] is 1 where layer i *uses* RoPE, as transformers has it
            uses_rope = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
                                                     for i in range(layers)]
            nope = tuple(i for i, flag in enumerate(uses_rope) if not flag)
        heads = hf["num_attention_heads"]
        attention_bias = hf.get("attention_bias", False)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", rope_params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=hf.get("mlp_bias", False),
            sliding_window=hf.get("sliding_window") if model_type in ("mistral", "phi3") else None,
            qk_norm=model_type == "qwen3",
            nope_layers=nope,
            partial_rotary_factor=float(partial),
            original_max_position_embeddings=hf.get("original_max_position_embeddings")
            if model_type == "phi3" else None,
            model_type=model_type,
        )

    def to_hf(self) -> dict:
        """A config.json that transformers reads as the same model."""
        hf = dict(
            model_type=self.model_type,
            architectures=[ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu",
        )
        if self.model_type in ("llama", "qwen3", "smollm3"):
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type in ("mistral", "phi3"):
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "phi3":
            hf.update(partial_rotary_factor=self.partial_rotary_factor,
                      original_max_position_embeddings=self.original_max_position_embeddings
                      or self.max_position_embeddings)
        if self.model_type == "smollm3":
            hf["no_rope_layers"] = [int(i not in self.nope_layers) for i in range(self.num_hidden_layers)]
        return hf


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 whatever the model's dtype, as the reference implementation does.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.head_dim = layer, c.head_dim
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qk_norm, self.rope = c.qk_norm, layer not in c.nope_layers

    def forward(self, x, cos, sin, mask, cache):
        B, T = cache.batch if cache is not None else x.shape[0], x.shape[1]   # x may be widened (linear.py)
        H, KV = self.n_heads, self.n_kv_heads
        qkv = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)[:B].view(B, T, H + 2 * KV, -1).transpose(1, 2)
        qk = qkv[:, :H + KV]
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), dim=1)
        if self.rope:
            qk = rope.apply(qk, cos, sin)   # query and key heads turn alike: one rotation
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV:]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.o_proj(attention(q, k, v, mask))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        gate, up = fused_linear(x, self.gate_proj, self.up_proj).split(self.up_proj.out_features, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rule = patterns.rule("local", window=config.sliding_window) if config.sliding_window else None
        # Made on the CPU even when the model is built on the meta device; .to(device) moves it.
        self.register_buffer("inv_freq", rope.inv_frequencies(config.rotary_dim, config.rope_theta,
                                                               config.rope_scaling), persistent=False)
        self.long_after, self.rope_scale = rope.longrope_switch(
            config.rope_scaling, config.max_position_embeddings, config.original_max_position_embeddings)
        if self.long_after is not None:
            self.register_buffer("long_inv_freq", rope.inv_frequencies(config.rotary_dim, config.rope_theta,
                                                                        config.rope_scaling, long=True), persistent=False)
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
                       self.lm_head.weight.dtype, self.lm_head.weight.device, self.rule)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, pad_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [batch, seq, vocab] (or [batch, 1, vocab] with last_only) for token ids [batch, seq]."""
        x = self.hidden_states(idx, cache, pad_mask)
        return self.lm_head(x[:, -1:] if last_only else x)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states [batch, seq, hidden] (what lm_head and reward heads read)."""
        if cache is None:
            positions, mask = positions_and_mask(pad_mask, idx.shape[1], idx.device, self.rule)
        else:
            positions, mask = cache.step(idx.shape[1], pad_mask)
        x = self.model.embed_tokens(idx)
        inv_freq = self.inv_freq
        if self.long_after is not None:
            # LongRoPE: once a forward pass reaches past the pretraining length, it turns with the long
            # factors, as transformers switches (cached keys keep the turn they were made with).
            # torch.where, not `if`, so that the decoding step stays one graph without a host sync.
            inv_freq = torch.where(positions.max() + 1 > self.long_after, self.long_inv_freq, self.inv_freq)
        cos, sin = rope.cos_sin(inv_freq, positions, x.dtype, self.rope_scale)
        if cache is not None:
            x = widen(x, self.lm_head)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, cache)
        return self.model.norm(x[:len(idx)])


def state_from_hf(tensors: dict) -> dict:
    # Older checkpoints carry the rotary inverse frequencies; they are recomputed from the config.
    return {name: t for name, t in tensors.items() if not name.endswith("rotary_emb.inv_freq")}


def state_to_hf(state: dict) -> dict:
    return state


Config, Model = LlamaConfig, Llama
