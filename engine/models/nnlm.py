"""Bengio et al. 2003, "A Neural Probabilistic Language Model".

    y = b + W x + U tanh(d + H x)

where x is the concatenation of the embeddings (C in the paper) of the previous n - 1 tokens, and
W, the direct connections from the input to the output, is optional. Positions before the start
of a text (and left padding) see a "start" embedding of their own, id V. The cache keeps the last
n - 1 ids of each row, so generating a token reads only those.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from engine.models.linear import Linear

MODEL_TYPES = ("parley_nnlm",)


@dataclass
class NNLMConfig:
    vocab_size: int
    context: int = 5                # n - 1: how many previous tokens the model sees
    embed_dim: int = 64             # m in the paper
    hidden_size: int = 256          # h
    direct: bool = True             # the direct connections W
    max_position_embeddings: int = 1024   # bounds only the prompt the chat keeps; the model reads n - 1
    model_type: str = "parley_nnlm"

    @classmethod
    def from_hf(cls, hf: dict) -> "NNLMConfig":
        return cls(vocab_size=hf["vocab_size"], context=hf["context"], embed_dim=hf["embed_dim"],
                   hidden_size=hf["hidden_size"], direct=hf.get("direct", True),
                   max_position_embeddings=hf.get("max_position_embeddings", 1024))

    def to_hf(self) -> dict:
        return {"model_type": self.model_type, "architectures": ["ParleyNNLM"], "vocab_size": self.vocab_size,
                "context": self.context, "embed_dim": self.embed_dim, "hidden_size": self.hidden_size,
                "direct": self.direct, "max_position_embeddings": self.max_position_embeddings}


class NNLM(nn.Module):
    tied_keys: list[str] = []

    def __init__(self, config: NNLMConfig):
        super().__init__()
        self.config = config
        inputs = config.context * config.embed_dim
        self.embed = nn.Embedding(config.vocab_size + 1, config.embed_dim)    # C, plus "start"
        self.hidden = Linear(inputs, config.hidden_size)                        # H, d
        self.lm_head = Linear(config.hidden_size, config.vocab_size)            # U, b
        self.direct = Linear(inputs, config.vocab_size, bias=False) if config.direct else None   # W

    def tie_weights(self):
        pass

    def new_cache(self, batch: int, max_len: int) -> "RecentIds":
        return RecentIds(batch, self.config.context, self.config.vocab_size, self.lm_head.weight.device)

    def forward(self, idx: torch.Tensor, cache: "RecentIds | None" = None, pad_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [batch, seq, vocab] (or [batch, 1, vocab] with last_only) for token ids [batch, seq]."""
        n, start = self.config.context, self.config.vocab_size
        if pad_mask is not None:
            idx = idx.masked_fill(~pad_mask.bool(), start)
        before = cache.ids if cache is not None else idx.new_full((idx.shape[0], n), start)
        seq = torch.cat([before, idx], dim=1)
        if cache is not None:
            cache.ids = seq[:, -n:]
        if last_only:
            seq = seq[:, -n:]
            windows = seq[:, None, :]
        else:
            windows = seq.unfold(1, n, 1)[:, 1:]   # the n ids ending at each position: [batch, seq, n]
        x = self.embed(windows).flatten(2)
        logits = self.lm_head(torch.tanh(self.hidden(x)))
        return logits + self.direct(x) if self.direct is not None else logits


class RecentIds:
    """The cache of a fixed-context model: the last n ids of each row."""

    def __init__(self, batch: int, n: int, start: int, device):
        self.ids = torch.full((batch, n), start, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.ids = self.ids.index_select(0, rows)


# Parley's own family: its checkpoints hold the module's own tensor names, so nothing to translate.
state_from_hf = state_to_hf = dict


Config, Model = NNLMConfig, NNLM
