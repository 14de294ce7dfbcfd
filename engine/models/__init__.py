"""Model families, keyed by the `model_type` of a Hugging Face config.json.

The model protocol, which every family meets, so that every decoding strategy, the compare view,
`parley generate`, `parley eval` and `parley train` work with all of them:

- a `Config` dataclass with `from_hf(config.json dict)` and `to_hf()`;
- a `Model` (nn.Module) with `forward(idx, cache=None, pad_mask=None, last_only=False)` giving
  next-token logits [batch, seq, vocab] for ids [batch, seq] (pad_mask: False at padding);
  `new_cache(batch, max_len)`: the incremental state of generation (a KV cache, a recurrent
  state, the last ids), whose `batch` counts its rows and whose `select_rows(rows)` keeps,
  repeats or reorders them; `lm_head` (its weight gives the model's device and dtype),
  `tie_weights()` and `tied_keys`;
- `state_from_hf` / `state_to_hf`, which translate checkpoint tensors (identity for Parley's own).

n-gram models meet the same protocol through engine.models.ngram.NGramNetwork, with counts
instead of tensors.
"""
from engine.errors import ParleyError
from engine.models import elmo, gemma, gpt2, llama, nnlm, phi3, rnn

FAMILIES = {model_type: module for module in (gpt2, llama, phi3, gemma, nnlm, rnn, elmo)
            for model_type in module.MODEL_TYPES}


def family(model_type: str | None):
    if model_type not in FAMILIES:
        hf = sorted(t for t in FAMILIES if not t.startswith("parley_"))
        own = ["ngram", *sorted(t for t in FAMILIES if t.startswith("parley_"))]
        raise ParleyError(f"config.json: model_type {model_type!r} is not supported: "
                          f"use one of {', '.join(hf)} (or Parley's own: {', '.join(own)})")
    return FAMILIES[model_type]
