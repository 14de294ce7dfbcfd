"""Fresh models for training, from named presets: a family (a model_type) and its sizes.

The Llama-family presets are Parley's chat models; the others put every family the textbooks
teach on the same data and tokenizer, at about the same size as chat-6m (~6M parameters with a
4k vocabulary), so that `parley eval` compares like with like.
"""
import math

import torch

from engine.errors import ParleyError
from engine.lm import LM
from engine.models import family
from engine.train.tokenizer import stop_ids

# 257 positions: trained with --seq-len 256, every learned position embedding gets trained, and
# `parley eval` reads no position the model never saw
GPT = dict(n_embd=256, n_layer=6, n_head=8, n_positions=257)
PRESETS = {
    # for tests: trains in seconds
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=256)),
    # the shipped chat model: ~6M parameters with a 4k vocabulary, under 25 MB in float32
    "chat-6m": ("llama", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=32, max_position_embeddings=512)),
    "chat-25m": ("llama", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                               num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)),
    # the shape of SmolLM2-135M
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                   max_position_embeddings=2048, rope_theta=100000.0)),
    # the classic families, for comparison
    "nnlm": ("parley_nnlm", dict(context=5, embed_dim=128, hidden_size=512, direct=True)),
    "rnn": ("parley_rnn", dict(cell="rnn", hidden_size=512, num_layers=2)),
    "gru": ("parley_rnn", dict(cell="gru", hidden_size=384, num_layers=2)),
    "lstm": ("parley_rnn", dict(cell="lstm", hidden_size=384, num_layers=2)),
    "gpt": ("gpt2", GPT),
    "gpt-local": ("gpt2", dict(GPT, attention_pattern="local", attention_window=32)),
    "gpt-dilated": ("gpt2", dict(GPT, attention_pattern="dilated", attention_window=16, attention_stride=4)),
    "gpt-strided": ("gpt2", dict(GPT, attention_pattern="strided", attention_stride=16)),
    "gpt-fixed": ("gpt2", dict(GPT, attention_pattern="fixed", attention_stride=16)),
}


def new_lm(preset: str, tokenizer, seed: int, **sizes) -> LM:
    """A freshly initialised model of a preset; `sizes` override the preset's (tests make tiny ones)."""
    if preset not in PRESETS:
        raise ParleyError(f"unknown model preset {preset!r}: use one of {', '.join(PRESETS)} or --model DIR")
    model_type, settings = PRESETS[preset]
    fam = family(model_type)
    config = fam.Config(vocab_size=tokenizer.vocab_size, **{**settings, **sizes})
    if model_type == "llama":
        config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = fam.Model(config)
    init_weights(model)
    hf = config.to_hf()
    eos = stop_ids(tokenizer)
    hf.update(eos_token_id=eos[0] if eos else None, pad_token_id=tokenizer.pad_token_id)
    return LM(model, tokenizer, hf, {"eos_token_id": eos})


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """GPT-2's initialisation: N(0, 0.02), with the projections into the residual stream scaled by
    1/sqrt(2 x layers) so the residual's variance does not grow with depth. Recurrent models keep
    torch's uniform(+-1/sqrt(hidden)) in their cells, and get embeddings uniform in +-0.1
    (Zaremba et al. 2014): with no normalisation after them, N(0, 0.02) inputs train far slower."""
    layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", 1)
    for name, p in model.named_parameters():
        if name.startswith("rnn."):
            continue
        if hasattr(model, "rnn") and name == "embed.weight":
            torch.nn.init.uniform_(p, -0.1, 0.1)
            continue
        if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight")):
            torch.nn.init.normal_(p, std=std / math.sqrt(2 * layers))
        else:
            torch.nn.init.normal_(p, std=std)
