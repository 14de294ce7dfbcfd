"""Fresh models for training, from named size presets (all Llama-family, Parley's default)."""
import math

import torch

from engine.errors import ParleyError
from engine.lm import LM
from engine.models import llama
from engine.train.tokenizer import stop_ids

PRESETS = {
    # for tests: trains in seconds
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
    # the shipped chat model: ~6M parameters with a 4k vocabulary, under 25 MB in float32
    "chat-6m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=32, max_position_embeddings=512),
    "chat-25m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=64, max_position_embeddings=1024),
    # the shape of SmolLM2-135M
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, rope_theta=100000.0),
}


def new_lm(preset: str, tokenizer, seed: int) -> LM:
    if preset not in PRESETS:
        raise ParleyError(f"unknown model preset {preset!r}: use one of {', '.join(PRESETS)} or --model DIR")
    config = llama.LlamaConfig(vocab_size=tokenizer.vocab_size, tie_word_embeddings=True, **PRESETS[preset])
    torch.manual_seed(seed)
    model = llama.Llama(config)
    init_weights(model, config.num_hidden_layers)
    hf = config.to_hf()
    eos = stop_ids(tokenizer)
    hf.update(eos_token_id=eos[0] if eos else None, pad_token_id=tokenizer.pad_token_id)
    return LM(model, tokenizer, hf, {"eos_token_id": eos})


def init_weights(model: torch.nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2's initialisation: N(0, 0.02), with the projections into the residual stream scaled by
    1/sqrt(2 x layers) so the residual's variance does not grow with depth."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, std=std / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(p, std=std)
