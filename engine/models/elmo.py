"""ELMo (Peters et al. 2018): deep contextual word vectors from a bidirectional language model.

The network (`BiLM`):
- a character-CNN token encoder (Kim et al. 2016): the bytes of each word, between begin- and
  end-of-word marks, are embedded; 1-D convolutions of several widths, each max-pooled over the
  word, are joined; highway layers, then a projection, give the token's vector x;
- a forward and a backward LSTM language model, each two layers of LSTMs with projections and a
  residual connection from the first layer to the second. The forward LM reads the words left to
  right and predicts the next one; the backward LM reads them right to left and predicts the one
  before. The two share the token encoder and the softmax over the word vocabulary (`lm_head`), as
  in the paper; only the LSTMs are their own.

The representation: layer 0 is x duplicated, [x; x], and layer j (1, 2) is [forward h_j; backward
h_j], so every layer is 2 x projection wide. ELMo_k = γ · Σ_j s_j h_{k,j}, s the softmax of learned
weights (`ScalarMix`).

Its forward direction meets the model protocol (engine/models/__init__.py), so a biLM generates and
enters `parley eval`: the ids of a word-level tokenizer (`word_tokenizer`, the words of
engine/models/word2vec.py `words`) in, next-word logits out, the forward LSTMs' state as the cache.
The model directory is a Hugging Face-format one: config.json (model_type parley_elmo),
model.safetensors (with `char_table`, each vocabulary word's characters) and tokenizer.json.
"""
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ParleyError
from engine.models.linear import Linear
from engine.models.rnn import RecurrentState, run_packed
from engine.models.word2vec import WORD

# torch says once that oneDNN lacks LSTMs with projections and it runs its own kernel: nothing to act on
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")

MODEL_TYPES = ("parley_elmo",)
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIALS = (UNK, BOS, EOS)   # ids 0, 1, 2; the words follow, most frequent first

# Character ids: 0 pads a word to max_characters, a byte b is b + 1, then the marks.
PAD_CHAR, BOW_CHAR, EOW_CHAR, BOS_CHAR, EOS_CHAR = 0, 257, 258, 259, 260
NUM_CHARS = 261
# A sentence's boundaries are words of one mark each, which no text can spell.
BOUNDARY_CHARS = {BOS: BOS_CHAR, EOS: EOS_CHAR}

# The chat template of a word-level biLM: each message one sentence, "<s> words </s>", as it was
# trained (engine/train/elmo.py); a reply starts at a new <s> and ends at </s>.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<s> ' + message['content'] + ' </s>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<s>' }}{% endif %}")


def characters(word: str, max_characters: int) -> list[int]:
    """The character ids of one word: begin-of-word, its UTF-8 bytes (cut to fit), end-of-word,
    padding to max_characters."""
    inner = [BOUNDARY_CHARS[word]] if word in BOUNDARY_CHARS else \
        [b + 1 for b in word.encode("utf-8")[:max_characters - 2]]
    ids = [BOW_CHAR, *inner, EOW_CHAR]
    return ids + [PAD_CHAR] * (max_characters - len(ids))


def char_ids(words: list[str], max_characters: int) -> torch.Tensor:
    """[len(words), max_characters] character ids."""
    return torch.tensor([characters(w, max_characters) for w in words], dtype=torch.long).view(-1, max_characters)


@dataclass
class BiLMConfig:
    vocab_size: int
    max_characters: int = 50      # per word, marks included (the paper's 50)
    char_dim: int = 16
    filters: tuple = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256))   # (width, count) of each convolution
    highway_layers: int = 2
    projection_dim: int = 128      # x and each LSTM layer's output (the paper: 512)
    hidden_size: int = 512         # LSTM cells (the paper: 4096)
    num_layers: int = 2
    max_position_embeddings: int = 1024   # bounds only the prompt the chat keeps
    model_type: str = "parley_elmo"

    def __post_init__(self):
        self.filters = tuple((int(w), int(n)) for w, n in self.filters)
        if not self.filters or any(w < 1 or n < 1 for w, n in self.filters):
            raise ParleyError(f"filters {list(self.filters)}: each convolution needs a width and a count of 1 or more")
        if max(w for w, _ in self.filters) > self.max_characters:
            raise ParleyError(f"max_characters {self.max_characters} is narrower than the widest filter "
                              f"({max(w for w, _ in self.filters)}): widen it or narrow the filters")

    @classmethod
    def from_hf(cls, hf: dict) -> "BiLMConfig":
        filters = hf.get("filters", cls.filters)
        if not isinstance(filters, (list, tuple)) or not all(isinstance(f, (list, tuple)) and len(f) == 2
                                                             and all(isinstance(v, int) for v in f) for f in filters):
            raise ParleyError(f"config.json: filters {filters!r} must be a list of [width, count] pairs of whole numbers")
        keys = ("max_characters", "char_dim", "highway_layers", "projection_dim", "hidden_size", "num_layers",
                "max_position_embeddings")
        return cls(vocab_size=hf["vocab_size"], filters=filters, **{k: hf[k] for k in keys if k in hf})

    def to_hf(self) -> dict:
        return {"model_type": self.model_type, "architectures": ["ParleyELMo"], "vocab_size": self.vocab_size,
                "max_characters": self.max_characters, "char_dim": self.char_dim,
                "filters": [list(f) for f in self.filters], "highway_layers": self.highway_layers,
                "projection_dim": self.projection_dim, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "max_position_embeddings": self.max_position_embeddings}


class CharCNN(nn.Module):
    """Words' character ids [..., max_characters] -> token vectors [..., projection_dim]."""

    def __init__(self, c: BiLMConfig):
        super().__init__()
        self.embed = nn.Embedding(NUM_CHARS, c.char_dim, padding_idx=PAD_CHAR)
        self.convs = nn.ModuleList(nn.Conv1d(c.char_dim, n, w) for w, n in c.filters)
        width = sum(n for _, n in c.filters)
        self.highways = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(c.highway_layers))
        self.projection = nn.Linear(width, c.projection_dim)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        shape = chars.shape[:-1]
        e = self.embed(chars.reshape(-1, chars.shape[-1])).transpose(1, 2)     # [N, char_dim, max_characters]
        x = torch.cat([F.relu(conv(e).max(-1).values) for conv in self.convs], -1)
        for highway in self.highways:
            h, gate = highway(x).chunk(2, -1)
            carry = torch.sigmoid(gate)
            x = carry * x + (1 - carry) * F.relu(h)
        return self.projection(x).view(*shape, -1)


def reverse_real(x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """x [batch, seq, ...] with each row's real tokens in reverse order, in the same places (the
    padding stays where it is, left or right). Its own inverse."""
    if pad_mask is None:
        return x.flip(1)
    order = torch.argsort((~pad_mask).int(), dim=1, stable=True)        # real positions first
    i = torch.arange(x.shape[1], device=x.device)[None]
    length = pad_mask.sum(1, keepdim=True)
    source = order.gather(1, torch.where(i < length, length - 1 - i, i))
    expand = lambda index: index.view(*index.shape, *[1] * (x.dim() - 2)).expand_as(x)
    return x.clone().scatter_(1, expand(order), x.gather(1, expand(source)))


class BiLM(nn.Module):
    def __init__(self, config: BiLMConfig):
        super().__init__()
        self.config = c = config
        self.encoder = CharCNN(c)
        lstms = lambda: nn.ModuleList(nn.LSTM(c.projection_dim, c.hidden_size, proj_size=c.projection_dim,
                                              batch_first=True) for _ in range(c.num_layers))
        self.forward_lstms, self.backward_lstms = lstms(), lstms()
        self.lm_head = Linear(c.projection_dim, c.vocab_size, bias=False)   # both directions' softmax
        # each vocabulary word's characters, so that ids alone (the model protocol) can be encoded
        self.register_buffer("char_table", torch.zeros(c.vocab_size, c.max_characters, dtype=torch.long))

    @property
    def tied_keys(self) -> list[str]:
        return []

    def tie_weights(self):
        pass   # the softmax is its own matrix: the token encoder reads characters, not ids

    def new_cache(self, batch: int, max_len: int) -> RecurrentState:
        return RecurrentState()

    def set_vocabulary(self, words: list[str]) -> None:
        if len(words) != self.config.vocab_size:
            raise ParleyError(f"{len(words)} words for a vocabulary of {self.config.vocab_size}")
        self.char_table.copy_(char_ids(words, self.config.max_characters))

    def run(self, lstms: nn.ModuleList, x: torch.Tensor, pad_mask: torch.Tensor | None, cache=None):
        """Each layer's outputs [batch, seq, projection_dim] of one direction's LSTMs over x, reading
        left to right (the backward direction is given x reversed); `cache` carries their state."""
        previous = cache.state if cache is not None else None
        outputs, hs, cs = [], [], []
        for j, lstm in enumerate(lstms):
            state = None if previous is None else (previous[0][j:j + 1].contiguous(), previous[1][j:j + 1].contiguous())
            if pad_mask is None or bool(pad_mask.all()):
                out, (h, c) = lstm(x, state)
            else:
                out, (h, c) = run_packed(lstm, x, pad_mask, state)
            x = out + x if j > 0 else out   # the residual connection, from the first layer on
            outputs.append(x)
            hs.append(h)
            cs.append(c)
        if cache is not None:
            cache.state = (torch.cat(hs), torch.cat(cs))
        return outputs

    def directions(self, chars: torch.Tensor, pad_mask: torch.Tensor | None = None):
        """(x, forward layers, backward layers) for words' character ids [batch, seq, max_characters]."""
        mask = None if pad_mask is None else pad_mask.bool()
        x = self.encoder(chars)
        forward = self.run(self.forward_lstms, x, mask)
        backward = [reverse_real(h, mask) for h in self.run(self.backward_lstms, reverse_real(x, mask), mask)]
        return x, forward, backward

    def layers(self, chars: torch.Tensor, pad_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """ELMo's layers, each [batch, seq, 2 x projection_dim]: [x; x], then [forward; backward] per LSTM layer."""
        x, forward, backward = self.directions(chars, pad_mask)
        return [torch.cat([x, x], -1)] + [torch.cat(fb, -1) for fb in zip(forward, backward)]

    def losses(self, ids: torch.Tensor, chars: torch.Tensor | None = None,
               pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward and the backward LM's mean cross-entropy over ids [batch, seq] (chars: their
        characters, default the vocabulary's): the forward state at t predicts word t + 1, the
        backward state at t word t - 1, wherever both words are real."""
        chars = self.char_table[ids] if chars is None else chars
        _, forward, backward = self.directions(chars, pad_mask)
        pairs = torch.ones_like(ids[:, 1:], dtype=torch.bool) if pad_mask is None else \
            pad_mask[:, 1:].bool() & pad_mask[:, :-1].bool()
        fwd = F.cross_entropy(self.lm_head(forward[-1][:, :-1][pairs]).float(), ids[:, 1:][pairs])
        bwd = F.cross_entropy(self.lm_head(backward[-1][:, 1:][pairs]).float(), ids[:, :-1][pairs])
        return fwd, bwd

    def forward(self, idx: torch.Tensor, cache: RecurrentState | None = None, pad_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """The forward LM's next-word logits [batch, seq, vocab] (or [batch, 1, vocab] with last_only)."""
        x = self.encoder(self.char_table[idx])
        top = self.run(self.forward_lstms, x, None if pad_mask is None else pad_mask.bool(), cache)[-1]
        return self.lm_head(top[:, -1:] if last_only else top)


class ScalarMix(nn.Module):
    """ELMo_k = γ Σ_j softmax(w)_j h_{k,j}: a task learns w and γ; at their start (w = 0, γ = 1) the
    mix is the mean of the layers."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        s = torch.softmax(self.weights, 0)
        return self.gamma * sum(w * h for w, h in zip(s, layers))


# -- what the vectors are for --

@torch.no_grad()
def contextual_vectors(model: BiLM, sentences: list[list[str]], layer: int | None = None,
                       batch_size: int = 64) -> list[torch.Tensor]:
    """Each word's vector in each sentence ([len(sentence), 2 x projection_dim] per sentence), the
    sentence read between <s> and </s> with each word's own characters (a word outside the
    vocabulary too): ELMo's `layer` (0 … num_layers), or with None their scalar mix at its start,
    the mean of the layers (without a task there is nothing to learn its weights from)."""
    device = model.lm_head.weight.device
    mix = ScalarMix(model.config.num_layers + 1).to(device)
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = [[BOS, *s, EOS] for s in sentences[start:start + batch_size]]
        width = max(map(len, batch))
        chars = torch.zeros(len(batch), width, model.config.max_characters, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for i, s in enumerate(batch):
            chars[i, :len(s)] = char_ids(s, model.config.max_characters)
            mask[i, :len(s)] = True
        layers = model.layers(chars.to(device), mask.to(device))
        vectors = (mix(layers) if layer is None else layers[layer]).float().cpu()
        out += [vectors[i, 1:len(s) - 1] for i, s in enumerate(batch)]
    return out


def contextual_neighbours(model: BiLM, context: list[str], word: str, sentences: list[list[str]], top: int,
                          layer: int | None = None) -> list[tuple[str, float, list[str], int]]:
    """The `top` words of `sentences`, each in its own sentence, whose vectors (`contextual_vectors`)
    have the largest cosine about their mean with `word`'s in `context` (its first occurrence):
    (word, cosine, sentence, position). Compared with other words in their contexts rather than with the
    vocabulary's context-free layer 0, since only there does a sense show: the top layer is
    the default, which Peters et al. (§5.3) found the best at word sense."""
    if layer is not None and not 0 <= layer <= model.config.num_layers:
        raise ParleyError(f"--layer {layer} is out of range: this biLM has layers 0 (the token vectors) to "
                          f"{model.config.num_layers}")
    if word not in context:
        raise ParleyError(f"{word!r} is not a word of the --context sentence ({' '.join(context) or 'no words'}): "
                          "give a sentence that holds it")
    if not any(sentences):
        raise ParleyError("there are no sentences to search (--data has no words): give a corpus with text")
    query = contextual_vectors(model, [context], layer)[0][context.index(word)]
    vectors = contextual_vectors(model, sentences, layer)
    where = [(n, i) for n, s in enumerate(sentences) for i in range(len(s))]
    vectors = torch.cat(vectors)
    # LSTM states share a large common direction (contextual vectors are anisotropic, Ethayarajh 2019),
    # so raw cosines all sit near 1: the cosine is taken about the searched words' mean vector
    mean = vectors.mean(0)
    cosine = F.normalize(vectors - mean, dim=-1) @ F.normalize(query - mean, dim=-1)
    best = torch.topk(cosine, min(top, len(where)))
    return [(sentences[n][i], c, sentences[n], i) for c, (n, i) in
            zip(best.values.tolist(), (where[k] for k in best.indices.tolist()))]


def word_tokenizer(vocab: list[str]):
    """An engine.tokenizer.Tokenizer over the biLM's words: lower-cased text cut by word2vec's WORD
    pattern (so it yields the words `words` yields), each word its id or <unk>'s; <s> and </s> are
    the sentence's bounds (bos and eos), and decoded words join with spaces."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    from engine.tokenizer import Tokenizer
    hf = HFTokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(WORD.pattern), behavior="removed", invert=True)
    hf.add_special_tokens(list(SPECIALS))
    return Tokenizer(hf, {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "chat_template": CHAT_TEMPLATE})


# Parley's own family: its checkpoints hold the module's own tensor names, so nothing to translate.
state_from_hf = state_to_hf = dict


Config, Model = BiLMConfig, BiLM
