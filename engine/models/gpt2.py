"""GPT-2 (Radford et al. 2019) and its distilled and resized variants, and Parley's own GPT-style
models with sparse attention patterns (engine.models.patterns).

Pre-norm blocks with LayerNorm, learned absolute positions, a tanh-GELU MLP and an lm_head tied
to the token embeddings. Hugging Face stores the projections as Conv1D ([in, out]); this module
uses nn.Linear ([out, in]) and transposes those four weights on load and save.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ParleyError
from engine.models import patterns
from engine.models.attention import attention
from engine.models.cache import KVCache, positions_and_mask
from engine.models.linear import Linear, widen

MODEL_TYPES = ("gpt2", "parley_gpt")
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    # Parley's own variants (engine.models.patterns): a sparse pattern makes the model_type
    # parley_gpt, so that transformers refuses it rather than run it with dense attention.
    attention_pattern: str = "dense"
    attention_window: int | None = None
    attention_stride: int | None = None
    model_type: str = "gpt2"

    @classmethod
    def from_hf(cls, hf: dict) -> "GPT2Config":
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ParleyError(f"config.json: activation_function {act!r} is not supported for gpt2: "
                              f"use one of {', '.join(ACTIVATIONS)}")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ParleyError(f"config.json: gpt2 with {flag}=true is not supported: set it to false")
        config = cls(vocab_size=hf["vocab_size"], n_positions=hf.get("n_positions", 1024), n_embd=hf["n_embd"],
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=hf.get("n_inner"),
                     activation_function=act, layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                     attention_pattern=hf.get("attention_pattern", "dense"),
                     attention_window=hf.get("attention_window"), attention_stride=hf.get("attention_stride"))
        config.rule()   # checks the pattern's settings
        return config

    def rule(self):
        return patterns.rule(self.attention_pattern, self.attention_window, self.attention_stride)

    def to_hf(self) -> dict:
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=self.vocab_size,
                  n_positions=self.n_positions, n_embd=self.n_embd, n_layer=self.n_layer, n_head=self.n_head,
                  n_inner=self.n_inner, activation_function=self.activation_function,
                  layer_norm_epsilon=self.layer_norm_epsilon, tie_word_embeddings=True)
        if self.attention_pattern != "dense":
            hf.update(model_type="parley_gpt", architectures=["ParleyGPT"], attention_pattern=self.attention_pattern,
                      attention_window=self.attention_window, attention_stride=self.attention_stride)
        return hf


class Attention(nn.Module):
    def __init__(self, c: GPT2Config, layer: int):
        super().__init__()
        self.layer, self.n_head = layer, c.n_head
        self.c_attn = Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = Linear(c.n_embd, c.n_embd)

    def forward(self, x, mask, cache):
        B, T = cache.batch if cache is not None else x.shape[0], x.shape[1]   # x may be widened (linear.py)
        q, k, v = self.c_attn(x)[:B].view(B, T, 3 * self.n_head, -1).transpose(1, 2).split(self.n_head, dim=1)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.c_proj(attention(q, k, v, mask))


class MLP(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        inner = c.n_inner or 4 * c.n_embd
        self.c_fc = Linear(c.n_embd, inner)
        self.c_proj = Linear(inner, c.n_embd)
        self.act = ACTIVATIONS[c.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPT2Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.attn = Attention(c, layer)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = MLP(c)

    def forward(self, x, mask, cache):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.rule = config.rule()
        self.tie_weights()

    tied_keys = ["lm_head.weight"]

    def tie_weights(self):
        self.lm_head.weight = self.transformer.wte.weight

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, c.n_embd // c.n_head, max_len,
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
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        if cache is not None:
            x = widen(x, self.lm_head)
        for block in self.transformer.h:
            x = block(x, mask, cache)
        return self.transformer.ln_f(x[:len(idx)])


def state_from_hf(tensors: dict) -> dict:
    state = {}
    for name, t in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers that old checkpoints saved; attention builds its own
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # the original OpenAI checkpoints have no prefix
        if name.endswith(CONV1D_WEIGHTS):
            t = t.t().contiguous()
        state[name] = t
    return state


def state_to_hf(state: dict) -> dict:
    return {name: t.t() if name.endswith(CONV1D_WEIGHTS) else t for name, t in state.items()}


Config, Model = GPT2Config, GPT2
