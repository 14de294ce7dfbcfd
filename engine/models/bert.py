"""BERT (Devlin et al. 2019): a bidirectional Transformer encoder pretrained by masked-language
modelling, in transformers' `BertForMaskedLM` layout, so that its checkpoints load by name.

Post-norm blocks (LayerNorm after each residual sum, as the paper has them), learned absolute
positions plus a segment ("token type") embedding, an erf-GELU MLP, and an MLM head (a dense layer,
GELU and LayerNorm, then the token embeddings again, with a bias of its own). Every token sees
every other real token: the only mask is padding.

BERT is not a causal language model, so it is not in engine.models.FAMILIES (it cannot decode
left to right). It scores text by pseudo-perplexity (`pseudo_log_likelihoods`, Salazar et al.
2020), trains by `mask_tokens` (15% of tokens, 80/10/10), and its [CLS] state serves as a reward
model's backbone (`hidden_states`).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ParleyError

MODEL_TYPES = ("bert",)
IGNORE = -100   # labels that the loss skips, as in transformers


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    model_type: str = "bert"

    @classmethod
    def from_hf(cls, hf: dict) -> "BertConfig":
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ParleyError(f"config.json: bert with hidden_act {hf['hidden_act']!r} is not supported: only 'gelu' is")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ParleyError("config.json: bert with relative position embeddings is not supported: "
                              "only position_embedding_type 'absolute' is")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"],
                   max_position_embeddings=hf.get("max_position_embeddings", 512),
                   type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12))

    def to_hf(self) -> dict:
        return dict(model_type="bert", architectures=["BertForMaskedLM"], vocab_size=self.vocab_size,
                    hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                    num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                    max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
                    layer_norm_eps=self.layer_norm_eps, hidden_act="gelu", position_embedding_type="absolute",
                    tie_word_embeddings=True)


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, idx, token_types):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.word_embeddings(idx) + self.position_embeddings(positions) + self.token_type_embeddings(token_types)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.n_heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, C)


class DenseNorm(nn.Module):
    """A projection added to the residual, then LayerNorm (BERT's post-norm)."""

    def __init__(self, c: BertConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c, c.hidden_size)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c.intermediate_size)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class PredictionHead(nn.Module):
    """cls.predictions: transform (dense, GELU, LayerNorm), then the tied token embeddings plus a bias."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, h, embeddings):
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(h)))
        return F.linear(h, embeddings, self.bias)


class Bert(nn.Module):
    """BertForMaskedLM: `forward` gives MLM logits, `hidden_states` the encoder's last states."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = Encoder(config)
        self.cls = nn.Module()
        self.cls.predictions = PredictionHead(config)

    def hidden_states(self, idx: torch.Tensor, pad_mask: torch.Tensor | None = None,
                      token_types: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, seq, hidden] for ids [batch, seq]; pad_mask False at padding (which no token attends to)."""
        if idx.shape[1] > self.config.max_position_embeddings:
            raise ParleyError(f"{idx.shape[1]} tokens are more than this BERT's {self.config.max_position_embeddings} "
                              "positions: shorten the text")
        mask = None if pad_mask is None else pad_mask.bool()[:, None, None, :]
        x = self.bert.embeddings(idx, torch.zeros_like(idx) if token_types is None else token_types)
        for layer in self.bert.encoder.layer:
            x = layer(x, mask)
        return x

    def forward(self, idx, pad_mask=None, token_types=None) -> torch.Tensor:
        h = self.hidden_states(idx, pad_mask, token_types)
        return self.cls.predictions(h, self.bert.embeddings.word_embeddings.weight)


def special_ids(tokenizer, *names: str) -> list[int]:
    """The ids of a BERT tokenizer's special tokens (cls_token, sep_token, mask_token), or one line
    naming the first it lacks."""
    ids = [tokenizer.token_id(tokenizer.special_tokens.get(name)) for name in names]
    if None in ids:
        raise ParleyError(f"this BERT's tokenizer has no {names[ids.index(None)]} (tokenizer_config.json): use a BERT "
                          "that `parley train mlm` wrote, or give its tokenizer [CLS], [SEP] and [MASK]")
    return ids


def state_from_hf(tensors: dict) -> dict:
    """A BertForMaskedLM checkpoint's tensors by this module's names: the decoder is the tied token
    embeddings and its bias is cls.predictions.bias (older checkpoints store both copies); a
    pooler (BertModel, BertForPreTraining) and the next-sentence head are not part of masked LM."""
    drop = ("cls.predictions.decoder.", "bert.pooler.", "cls.seq_relationship.", "position_ids")
    return {k: v for k, v in tensors.items() if not any(d in k for d in drop)}


def state_to_hf(state: dict) -> dict:
    return dict(state)


# -- masked-language-model training ---------------------------------------------------------------
def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab_size: int,
                generator: torch.Generator, rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: each maskable token is chosen with probability `rate`; a chosen token
    becomes [MASK] 80% of the time, a random token 10%, and stays itself 10% (so that the model
    cannot tell which real tokens it will be asked about). Returns (inputs, labels), labels
    IGNORE wherever the token was not chosen."""
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & maskable
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), mask_id, ids)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, torch.where(chosen, ids, IGNORE)


def mlm_loss(model: Bert, inputs: torch.Tensor, labels: torch.Tensor, pad_mask: torch.Tensor | None = None):
    logits = model(inputs, pad_mask)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


# -- scoring ----------------------------------------------------------------------------------------
@torch.no_grad()
def pseudo_log_likelihoods(model: Bert, ids: list[int], scored: list[bool], mask_id: int,
                           batch_size: int = 32) -> list[float]:
    """log p(x_i | every other token) for each position i where `scored` is true, each with x_i
    masked in its own copy of the text (Salazar et al. 2020). Their mean's negative, exponentiated,
    is the pseudo-perplexity: a measure of a bidirectional model, not comparable to the perplexity
    of a causal one, which predicts each token from its left alone."""
    positions = [i for i, s in enumerate(scored) if s]
    row = torch.tensor(ids)
    out = []
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        batch = row.repeat(len(chunk), 1)
        batch[torch.arange(len(chunk)), chunk] = mask_id
        embeddings = model.bert.embeddings.word_embeddings.weight
        h = model.hidden_states(batch.to(embeddings.device))
        # the head at the masked token alone: a quarter of the work, were it run at every position
        logits = model.cls.predictions(h[torch.arange(len(chunk)), chunk], embeddings)
        logprobs = logits.float().log_softmax(-1).cpu()
        out += logprobs[torch.arange(len(chunk)), row[chunk]].tolist()
    return out


def pseudo_perplexity(log_likelihoods: list[float]) -> float:
    return math.exp(-sum(log_likelihoods) / len(log_likelihoods))


# -- files --------------------------------------------------------------------------------------------
def load(path: str | Path, device: str | torch.device = "cpu"):
    """A BertForMaskedLM directory (config.json, safetensors, tokenizer.json): (model, tokenizer)."""
    from engine import checkpoint
    from engine.lm import _read_config
    from engine.tokenizer import Tokenizer
    path = Path(path).expanduser()
    checkpoint.check_model_dir(path)
    hf = checkpoint.read_json(path / "config.json")
    if hf.get("model_type") != "bert":
        raise ParleyError(f"{path / 'config.json'}: model_type is {hf.get('model_type')!r}, not 'bert': "
                          "pass a BERT directory (parley train mlm writes one)")
    config = _read_config(path / "config.json", BertConfig, hf)
    with torch.device("meta"):
        model = Bert(config)
    tensors = state_from_hf(checkpoint.read_tensors(path, torch.device(device), torch.float32))
    checkpoint.check_tensors(checkpoint.weight_files(path)[0], model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=False, assign=True)
    return model.eval(), Tokenizer.from_dir(path)


def write(model: Bert, tokenizer, directory: Path) -> None:
    """The model's files into `directory` (files.output_dir makes that atomic), as transformers writes them."""
    from engine import checkpoint
    from engine.files import write_json
    checkpoint.write_tensors(directory, state_to_hf(model.state_dict()))
    write_json(directory / "config.json", {**model.config.to_hf(), "torch_dtype": "float32"})
    tokenizer.save(directory)


Config, Model = BertConfig, Bert
