"""The logits processors that apply decoding settings, one row of a batch per candidate.

Every processor works on per-row tensors, so a batch of candidates with different settings is
processed in one pass, and a row whose setting is at its neutral value is left exactly as it was.
The order is transformers' for the options both have, with OpenAI's frequency and presence
penalties placed right after the repetition penalty (as llama.cpp does):

    repetition penalty -> frequency/presence penalties -> no-repeat n-gram -> min new tokens (EOS
    blocked) -> temperature -> top-k -> top-p -> min-p -> typical-p

Beam search ranks beams by log-probability and so uses only the steps before temperature.
"""
import torch

from engine.settings import Settings


class RowSettings:
    """The settings of every row of a batch as tensors [rows, 1], ready for the processors."""

    def __init__(self, settings: list[Settings], device):
        def col(name, dtype=torch.float32):
            return torch.tensor([getattr(s, name) for s in settings], dtype=dtype, device=device)[:, None]
        self.settings = settings
        sample = torch.tensor([s.strategy == "sample" for s in settings], dtype=torch.bool, device=device)[:, None]
        self.sample = sample
        self.beam = torch.tensor([s.num_beams > 1 for s in settings], dtype=torch.bool, device=device)[:, None]
        self.temperature = torch.where(sample, col("temperature"), torch.ones_like(col("temperature")))
        self.top_k, self.top_p = col("top_k", torch.long), col("top_p")
        self.min_p, self.typical_p = col("min_p"), col("typical_p")
        self.repetition_penalty = col("repetition_penalty")
        self.frequency_penalty, self.presence_penalty = col("frequency_penalty"), col("presence_penalty")
        self.min_new_tokens = col("min_new_tokens", torch.long)
        self.ngram = [s.no_repeat_ngram_size for s in settings]
        # Which processors are on in which row; only sampling rows use the warpers.
        self.on = {
            "repetition": col("repetition_penalty") != 1.0,
            "penalties": (col("frequency_penalty") != 0) | (col("presence_penalty") != 0),
            "top_k": sample & (self.top_k > 0),
            "top_p": sample & (self.top_p < 1.0),
            "min_p": sample & (self.min_p > 0),
            "typical": sample & (self.typical_p < 1.0),
        }
        self.any = {name: bool(mask.any()) for name, mask in self.on.items()}
        self.any["ngram"] = any(self.ngram)


def repetition_penalty(scores, seen, penalty, on):
    """transformers' rule: divide a positive score by the penalty, multiply a negative one, for seen tokens."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen & on, penalised, scores)


def frequency_presence_penalty(scores, counts, frequency, presence, on):
    """OpenAI's rule: minus frequency x count, minus presence if the token has appeared in the output."""
    penalty = frequency * counts + presence * (counts > 0)
    return torch.where(on, scores - penalty, scores)


def banned_ngram_tokens(sequences: torch.Tensor, n: int) -> torch.Tensor:
    """(row, token) pairs [k, 2] of the tokens that would complete an n-gram already in the row.

    `sequences` holds -1 at padding, which never matches a real token.
    """
    rows, length = sequences.shape
    if length < n:
        return sequences.new_zeros(0, 2)
    if n == 1:
        tokens = sequences
        row_idx = torch.arange(rows, device=sequences.device)[:, None].expand_as(tokens)
        keep = tokens >= 0
        return torch.stack([row_idx[keep], tokens[keep]], dim=1)
    windows = sequences.unfold(1, n, 1)                      # [rows, length - n + 1, n]
    prefix = sequences[:, length - n + 1:]                   # the last n - 1 tokens
    match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1) & (windows[:, :, -1] >= 0)
    row_idx, win_idx = match.nonzero(as_tuple=True)
    return torch.stack([row_idx, windows[row_idx, win_idx, -1]], dim=1)


def no_repeat_ngram(scores, sequences, sizes: list[int]):
    for n in sorted(set(sizes) - {0}):
        rows = torch.tensor([i for i, s in enumerate(sizes) if s == n], device=scores.device)
        banned = banned_ngram_tokens(sequences[rows], n)
        scores[rows[banned[:, 0]], banned[:, 1]] = -float("inf")
    return scores


def block_eos(scores, n_generated, min_new_tokens, eos_ids: list[int]):
    if eos_ids:
        blocked = (n_generated[:, None] < min_new_tokens)
        eos = torch.tensor(eos_ids, device=scores.device)
        scores[:, eos] = torch.where(blocked, -float("inf"), scores[:, eos])
    return scores


def top_k(scores, k, on):
    """Keep tokens scoring at least the k-th best (ties at the k-th are all kept, as in transformers)."""
    k = k.clamp(min=1, max=scores.shape[-1])
    kth = scores.topk(int(k.max()), dim=-1).values.gather(1, k - 1)
    return scores.masked_fill(on & (scores < kth), -float("inf"))


def top_p(scores, p, on, min_keep: int = 1):
    sorted_scores, order = scores.sort(dim=-1, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[:, -min_keep:] = False
    remove = remove.scatter(1, order, remove)
    return scores.masked_fill(on & remove, -float("inf"))


def min_p(scores, p, on, min_keep: int = 1):
    probs = scores.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    order = scores.argsort(dim=-1, descending=True)
    sorted_remove = remove.gather(1, order)
    sorted_remove[:, :min_keep] = False
    remove = sorted_remove.scatter(1, order, sorted_remove)
    return scores.masked_fill(on & remove, -float("inf"))


def typical(scores, mass, on, min_keep: int = 1):
    """Locally typical sampling (Meister et al. 2022), in transformers' formulation."""
    logp = scores.log_softmax(dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted, order = (-logp - entropy).abs().sort(dim=-1)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp(max=scores.shape[-1] - 1)
    sorted_remove = shifted > shifted.gather(1, last[:, None])
    sorted_remove[:, :min_keep] = False
    remove = sorted_remove.scatter(1, order, sorted_remove)
    return scores.masked_fill(on & remove, -float("inf"))


def process(scores: torch.Tensor, rows: RowSettings, seen: torch.Tensor, counts: torch.Tensor,
            sequences: torch.Tensor, n_generated: torch.Tensor, eos_ids: list[int], warp: bool = True) -> torch.Tensor:
    """Apply every row's processors to scores [rows, vocab] (logits, or log-probs for beams)."""
    scores = scores.clone()
    if rows.any["repetition"]:
        scores = repetition_penalty(scores, seen | (counts > 0), rows.repetition_penalty, rows.on["repetition"])
    if rows.any["penalties"]:
        scores = frequency_presence_penalty(scores, counts, rows.frequency_penalty, rows.presence_penalty,
                                            rows.on["penalties"])
    if rows.any["ngram"]:
        scores = no_repeat_ngram(scores, sequences, rows.ngram)
    scores = block_eos(scores, n_generated, rows.min_new_tokens, eos_ids)
    if not warp:
        return scores
    scores = scores / rows.temperature
    if rows.any["top_k"]:
        scores = top_k(scores, rows.top_k, rows.on["top_k"])
    if rows.any["top_p"]:
        scores = top_p(scores, rows.top_p, rows.on["top_p"])
    if rows.any["min_p"]:
        scores = min_p(scores, rows.min_p, rows.on["min_p"])
    if rows.any["typical"]:
        scores = typical(scores, rows.typical_p, rows.on["typical"])
    return scores


# -- reproducible per-row randomness ---------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # Wellons' lowbias32 in int64 arithmetic: products wrap, and masking keeps the low 32 bits.
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), [rows, vocab], that depend only on (seed, step, token id).

    A row's draws are thus the same whatever else shares the batch, and on any device.
    """
    key = _hash32(_hash32(seeds ^ (seeds >> 32)) ^ _hash32(step + 0x9E3779B9))
    tokens = torch.arange(vocab, device=seeds.device)
    bits = _hash32(key[:, None] ^ _hash32(tokens[None, :] + 0x632BE5AB)) >> 8   # 24 random bits
    return (bits.float() + 0.5) / float(1 << 24)


def sample(scores: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scores), by an exponential race: argmax p_i / E_i with E_i ~ Exp(1).

    This is exactly a draw from the distribution, with the row's own reproducible noise.
    """
    exponential = -torch.log(uniform_noise(seeds, step, scores.shape[-1]))
    probs = scores.softmax(dim=-1)
    return (probs / exponential).argmax(dim=-1)
