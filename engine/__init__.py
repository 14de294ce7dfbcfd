"""Parley's engine: models, tokenizers, decoding, training and the store. No UI code lives here.

The stable entry point is `engine.load(path, device=None, dtype=None)`, which returns an `LM`
with `.logits(input_ids)`, `.tokenizer`, `.config` and `.save(path)`.
"""
from engine.errors import ParleyError

__all__ = ["LM", "ParleyError", "load"]


def __getattr__(name):
    # Importing torch takes seconds; `parley --help` and the app's first frame should not wait for it.
    if name in ("LM", "load"):
        from engine import lm
        return getattr(lm, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
