"""Model families, keyed by the `model_type` of a Hugging Face config.json.

Each family module has a `Config` dataclass (`from_hf`, `to_hf`), a `Model` (an nn.Module with
`forward(idx, cache=None, pad_mask=None, last_only=False)`, `new_cache`, `tie_weights` and
`tied_keys`), and `state_from_hf` / `state_to_hf` to translate checkpoint tensors.
"""
from engine.errors import ParleyError
from engine.models import gpt2, llama

FAMILIES = {model_type: module for module in (gpt2, llama) for model_type in module.MODEL_TYPES}


def family(model_type: str | None):
    if model_type not in FAMILIES:
        raise ParleyError(f"config.json: model_type {model_type!r} is not supported: "
                          f"use one of {', '.join(sorted(FAMILIES))} (or ngram, Parley's own)")
    return FAMILIES[model_type]
