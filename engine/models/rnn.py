"""Recurrent language models: Elman's RNN (1990), the GRU (Cho et al. 2014) and the LSTM
(Hochreiter & Schmidhuber 1997), multi-layer, on torch's (cuDNN-backed) recurrent layers.

The hidden state is the cache: generating a token reads that one token and the state, never the
context again. A padding mask (left padding in generation batches, right padding in training
batches) is honoured by packing each row's real tokens, so padding never enters the state.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from engine.errors import ParleyError
from engine.models.linear import Linear

MODEL_TYPES = ("parley_rnn",)
CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class RNNConfig:
    vocab_size: int
    cell: str = "lstm"              # rnn (Elman, tanh), gru or lstm
    hidden_size: int = 256
    num_layers: int = 2
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 1024   # bounds only the prompt the chat keeps
    model_type: str = "parley_rnn"

    @classmethod
    def from_hf(cls, hf: dict) -> "RNNConfig":
        if hf.get("cell") not in CELLS:
            raise ParleyError(f"config.json: cell {hf.get('cell')!r} is unknown: use one of {', '.join(CELLS)}")
        return cls(vocab_size=hf["vocab_size"], cell=hf["cell"], hidden_size=hf["hidden_size"],
                   num_layers=hf["num_layers"], tie_word_embeddings=hf.get("tie_word_embeddings", True),
                   max_position_embeddings=hf.get("max_position_embeddings", 1024))

    def to_hf(self) -> dict:
        return {"model_type": self.model_type, "architectures": ["ParleyRNN"], "vocab_size": self.vocab_size,
                "cell": self.cell, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "tie_word_embeddings": self.tie_word_embeddings,
                "max_position_embeddings": self.max_position_embeddings}


class RNNLM(nn.Module):
    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rnn = CELLS[config.cell](config.hidden_size, config.hidden_size, config.num_layers, batch_first=True)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def tied_keys(self) -> list[str]:
        return ["lm_head.weight"] if self.config.tie_word_embeddings else []

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self, batch: int, max_len: int) -> "RecurrentState":
        return RecurrentState()

    def forward(self, idx: torch.Tensor, cache: "RecurrentState | None" = None, pad_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [batch, seq, vocab] (or [batch, 1, vocab] with last_only) for token ids [batch, seq]."""
        x = self.embed(idx)
        state = cache.state if cache is not None else None
        if pad_mask is None or bool(pad_mask.all()):
            out, state = self.rnn(x, state)
        else:
            out, state = run_packed(self.rnn, x, pad_mask.bool(), state)
        if cache is not None:
            cache.state = state
        return self.lm_head(out[:, -1:] if last_only else out)

def run_packed(rnn: nn.RNNBase, x: torch.Tensor, pad_mask: torch.Tensor, state=None):
    """Run `rnn` over only the real tokens of each row of x [batch, seq, dim] (wherever the padding
    is), then put the outputs back in place (zeros at padding); the state is each row's after its
    last real token."""
    order = torch.argsort((~pad_mask).int(), dim=1, stable=True)      # real positions first
    lengths = pad_mask.sum(1).clamp(min=1).cpu()
    gathered = x.gather(1, order[..., None].expand_as(x))
    packed = pack_padded_sequence(gathered, lengths, batch_first=True, enforce_sorted=False)
    out, state = rnn(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    result = torch.zeros_like(out).scatter(1, order[..., None].expand_as(out), out)
    return result, state


class RecurrentState:
    """The cache of a recurrent model: its hidden state (h, or (h, c) for an LSTM), [layers, batch, hidden]."""

    def __init__(self):
        self.state = None

    @property
    def batch(self) -> int:
        h = self.state[0] if isinstance(self.state, tuple) else self.state
        return 0 if h is None else h.shape[1]

    def select_rows(self, rows: torch.Tensor) -> None:
        if isinstance(self.state, tuple):
            self.state = tuple(s.index_select(1, rows) for s in self.state)
        elif self.state is not None:
            self.state = self.state.index_select(1, rows)


# Parley's own family: its checkpoints hold the module's own tensor names, so nothing to translate.
state_from_hf = state_to_hf = dict


Config, Model = RNNConfig, RNNLM
