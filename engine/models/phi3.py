"""Phi-3 (Microsoft, 2024): a Llama decoder (engine/models/llama.py) whose checkpoints stack the
query, key and value projections in one tensor (`qkv_proj`) and the gate and up projections in
another (`gate_up_proj`). The model is llama.py's, with Phi-3's sliding window; only the tensors
are translated, split on load and stacked again on save, so transformers reads what Parley writes.

The split needs no config: a query has as many rows as the output projection has columns, the
key and value share the rest equally, and gate and up are halves. A tensor that cannot be split
keeps its name, and the load names it as not part of the model (engine.checkpoint.check_tensors).
"""
import torch

from engine.models import llama

MODEL_TYPES = ("phi3",)
QKV, GATE_UP = ".self_attn.qkv_proj.weight", ".mlp.gate_up_proj.weight"


def state_from_hf(tensors: dict) -> dict:
    out = {}
    for name, t in llama.state_from_hf(tensors).items():
        layer = name.rsplit(".", 3)[0]   # model.layers.N
        o_proj = tensors.get(layer + ".self_attn.o_proj.weight")
        if name.endswith(QKV) and t.dim() == 2 and o_proj is not None and o_proj.dim() == 2 \
                and (len(t) - o_proj.shape[1]) % 2 == 0:
            kv_rows = (len(t) - o_proj.shape[1]) // 2
            for part, piece in zip("qkv", t.split([o_proj.shape[1], kv_rows, kv_rows])):
                out[f"{layer}.self_attn.{part}_proj.weight"] = piece
        elif name.endswith(GATE_UP) and t.dim() == 2 and len(t) % 2 == 0:
            out[layer + ".mlp.gate_proj.weight"], out[layer + ".mlp.up_proj.weight"] = t.chunk(2)
        else:
            out[name] = t
    return out


def state_to_hf(state: dict) -> dict:
    out = {}
    for name, t in state.items():
        layer = name.rsplit(".", 3)[0]
        if name.endswith(".self_attn.q_proj.weight"):
            out[layer + QKV] = torch.cat([state[f"{layer}.self_attn.{part}_proj.weight"] for part in "qkv"])
        elif name.endswith(".mlp.gate_proj.weight"):
            out[layer + GATE_UP] = torch.cat([t, state[layer + ".mlp.up_proj.weight"]])
        elif not name.endswith((".self_attn.k_proj.weight", ".self_attn.v_proj.weight", ".mlp.up_proj.weight")):
            out[name] = t
    return out


Config, Model = llama.LlamaConfig, llama.Llama
