"""The logits processors that apply decoding settings, one row of a batch per candidate.

Every processor works on per-row tensors, so a batch of candidates with different settings is
processed in one pass, and a row whose setting is at its neutral value is left exactly as it was.
End-of-text is blocked first (min_new_tokens), then the samplers run in each row's
`sampler_order` (engine/settings.py). The default is transformers' order for the options both
have, with OpenAI's frequency and presence penalties right after the repetition penalty (as
llama.cpp does), and the samplers transformers lacks where llama.cpp puts them:

    penalties (repetition, then frequency/presence) -> no-repeat n-gram -> DRY -> temperature
    (dynamic when dynatemp_range > 0) -> top-n-sigma -> top-k -> top-p -> min-p -> typical-p ->
    epsilon -> eta -> XTC -> Mirostat v2

Greedy and beam rows use only penalties, no-repeat n-grams and DRY (beam search ranks beams by
log-probability); the others act on sampling rows only. Rows with different orders share a batch:
each processor runs once per position it holds in some row's order, on the rows that put it there.
"""
import math

import torch

from engine.settings import SAMPLERS, Settings, parse_order

# what each name in sampler_order runs, in order
STAGES = {name: (name,) for name in SAMPLERS} | {"penalties": ("repetition", "frequency_presence")}
# the processors greedy and beam rows use too
ALL_ROWS = ("repetition", "frequency_presence", "no_repeat_ngram", "dry")


class RowSettings:
    """The settings of every row of a batch as tensors [rows, 1], ready for the processors, and
    `chain`: (processor, the rows it acts on) in the order they run, the ones acting on no row left
    out. `tokenizer` (its `token_texts`) is read only when a row uses DRY, for its sequence breakers."""

    def __init__(self, settings: list[Settings], device, tokenizer=None):
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
        self.dry_multiplier, self.dry_base = col("dry_multiplier"), col("dry_base")
        self.dry_allowed_length = col("dry_allowed_length", torch.long)
        self.xtc_threshold, self.xtc_probability = col("xtc_threshold"), col("xtc_probability")
        self.top_n_sigma = col("top_n_sigma")
        self.epsilon_cutoff, self.eta_cutoff = col("epsilon_cutoff"), col("eta_cutoff")
        self.dynatemp_range, self.dynatemp_exponent = col("dynatemp_range"), col("dynatemp_exponent")
        self.mirostat_tau, self.mirostat_eta = col("mirostat_tau"), col("mirostat_eta")
        self.seeds = torch.tensor([s.seed or 0 for s in settings], dtype=torch.long, device=device)
        # Which processors are on in which row; only sampling rows use the warpers.
        self.on = {
            "repetition": col("repetition_penalty") != 1.0,
            "frequency_presence": (col("frequency_penalty") != 0) | (col("presence_penalty") != 0),
            "no_repeat_ngram": torch.tensor([n > 0 for n in self.ngram], device=device)[:, None],
            "dry": self.dry_multiplier > 0,
            "temperature": sample,
            "top_n_sigma": sample & (self.top_n_sigma > 0),
            "top_k": sample & (self.top_k > 0),
            "top_p": sample & (self.top_p < 1.0),
            "min_p": sample & (self.min_p > 0),
            "typical_p": sample & (self.typical_p < 1.0),
            "epsilon": sample & (self.epsilon_cutoff > 0),
            "eta": sample & (self.eta_cutoff > 0),
            "xtc": sample & (self.xtc_probability > 0),
            "mirostat": sample & (self.mirostat_tau > 0),
        }
        self.dynatemp = sample & (self.dynatemp_range > 0)
        self.chain = self._chain([parse_order(s.sampler_order) for s in settings], device)
        self.mirostat = any(name == "mirostat" for name, _ in self.chain)
        self.breakers = None
        if any(name == "dry" for name, _ in self.chain):
            self.breakers = breaker_rows(settings, tokenizer, device)

    def _chain(self, orders: list[tuple[str, ...]], device) -> list[tuple[str, object]]:
        """For each position of the orders, each sampler some row puts there, on those rows. The
        rows are a mask [rows, 1], or for no-repeat n-grams each row's size (0 where off)."""
        chain, one = [], len(set(orders)) == 1
        for position in range(len(SAMPLERS)):
            for stage in dict.fromkeys(order[position] for order in orders):
                here = [order[position] == stage for order in orders]
                for name in STAGES[stage]:
                    if name == "no_repeat_ngram":
                        rows = [n if h else 0 for n, h in zip(self.ngram, here)]
                        if any(rows):
                            chain.append((name, rows))
                        continue
                    rows = self.on[name] if one else self.on[name] & torch.tensor(here, device=device)[:, None]
                    if bool(rows.any()):
                        chain.append((name, rows))
        return chain


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
    """Ban the tokens that would complete a repeated n-gram, n = each row's size (0 = off)."""
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


def dry(scores, sequences, multiplier, base, allowed, breakers, on):
    """DRY, "don't repeat yourself" (p-e-w's method, as llama.cpp's DRY sampler computes it): a token
    that would extend a repeat of the context's last n tokens (n >= allowed) loses
    multiplier x base ** (n - allowed) from its logit, n being the longest such repeat. A repeat never
    includes a sequence breaker, and a breaker token is never penalised. `sequences` [rows, length]
    is prompt + output, -1 at padding; `breakers` [rows, vocab] marks each row's breaker tokens.

    Written by hand: transformers has no DRY. Instead of llama.cpp's Z-algorithm, every earlier
    position's match with the context's end grows one token per pass, all positions at once, until
    no match is still growing (or until longer ones could not raise the clamped penalty)."""
    idx = on[:, 0].nonzero()[:, 0]
    seq, length = sequences[idx], sequences.shape[1]
    if length < 2:
        return scores
    multiplier, base, allowed, breakers = multiplier[idx], base[idx], allowed[idx], breakers[idx]
    vocab = scores.shape[-1]   # the model's vocabulary may be wider (or narrower) than the tokenizer's
    breakers = torch.nn.functional.pad(breakers, (0, max(0, vocab - breakers.shape[1])))[:, :vocab]
    valid = seq >= 0
    barred = ~valid | breakers.gather(1, seq.clamp(min=0))   # tokens a repeat cannot include
    # llama.cpp keeps base ** exponent finite by clamping the exponent at log(float max) / log(base)
    steep = base > 1.000001
    max_exponent = torch.where(steep, (88.7228391 / base.log()).floor(), math.inf)
    longest = int((allowed + max_exponent).amax().clamp(max=length - 1))
    ends = torch.arange(length - 1, device=seq.device)       # a repeat may end at any earlier position
    repeat = torch.zeros_like(seq[:, :-1])                    # [rows, length - 1] repeat length ending there
    growing = torch.ones_like(valid[:, :-1])                   # padding (-1) never equals a token, so stops it
    for k in range(longest):
        tail = length - 1 - k                                 # the context's end, k tokens back
        earlier = ends - k
        growing &= (earlier >= 0) & ~barred[:, tail:tail + 1] & (
            seq.gather(1, earlier.clamp(min=0).expand_as(growing)) == seq[:, tail:tail + 1])
        if not bool(growing.any()):
            break
        repeat += growing
    following = seq[:, 1:]                                    # the token that would extend each repeat
    counted = valid[:, :-1] & valid[:, 1:] & (repeat >= allowed)
    longest_per_token = torch.full_like(breakers, -1, dtype=torch.long).scatter_reduce(
        1, following.clamp(min=0), torch.where(counted, repeat, -1), reduce="amax")
    penalised = (longest_per_token >= 0) & ~breakers
    exponent = torch.minimum((longest_per_token - allowed).float(), max_exponent)
    penalty = torch.where(penalised, multiplier * base ** exponent, 0.0)
    scores[idx] = scores[idx] - penalty
    return scores


def breaker_rows(settings: list[Settings], tokenizer, device) -> torch.Tensor:
    """[rows, vocab]: the tokens whose text contains one of the row's DRY sequence breakers.

    As llama.cpp for a breaker within one token; a breaker only several tokens spell together
    (llama.cpp also follows those) is not recognised."""
    texts = tokenizer.token_texts if tokenizer is not None else []
    masks = {breakers: _breaker_mask(texts, breakers) for breakers in {tuple(s.dry_sequence_breakers)
                                                                      for s in settings}}
    return torch.stack([masks[tuple(s.dry_sequence_breakers)] for s in settings]).to(device)


_BREAKER_MASKS: dict[tuple, tuple[list, torch.Tensor]] = {}   # the batch's rows are rebuilt often (beams)


def _breaker_mask(texts: list[str], breakers: tuple[str, ...]) -> torch.Tensor:
    key = (id(texts), breakers)
    if key not in _BREAKER_MASKS or _BREAKER_MASKS[key][0] is not texts:
        if len(_BREAKER_MASKS) > 16:
            _BREAKER_MASKS.clear()
        _BREAKER_MASKS[key] = texts, torch.tensor([any(b in t for b in breakers) for t in texts], dtype=torch.bool)
    return _BREAKER_MASKS[key][1]


def temperature(scores, t, dyn_range, exponent, dynamic):
    """Divide by the temperature; on `dynamic` rows (llama.cpp's dynamic temperature) that is
    t - range + 2 range x (entropy / its maximum) ** exponent, over the tokens still in play and
    never below 0; a temperature of 0 keeps only the top tokens."""
    if dynamic is not None:
        logp = scores.log_softmax(dim=-1)
        entropy = -(logp.exp() * logp).nansum(dim=-1, keepdim=True)
        n = (scores > -math.inf).sum(dim=-1, keepdim=True)
        normalised = torch.where(n > 1, entropy / n.clamp(min=2).log(), 0.0)
        low = (t - dyn_range).clamp(min=0)
        t = torch.where(dynamic, low + (t + dyn_range - low) * normalised ** exponent, t)
        frozen = dynamic & (t <= 0)
        scores = scores.masked_fill(frozen & (scores < scores.amax(dim=-1, keepdim=True)), -math.inf)
        t = torch.where(frozen, 1.0, t)
    return scores / t


def top_n_sigma(scores, n, on):
    """Top-nσ (Tang et al. 2025): keep the tokens whose logit is within n standard deviations of
    the top one, the deviation over the tokens still in play (as llama.cpp). Ties at the edge stay."""
    finite = scores > -math.inf
    count = finite.sum(dim=-1, keepdim=True)
    mean = scores.where(finite, 0.0).sum(dim=-1, keepdim=True) / count
    sigma = ((scores - mean).where(finite, 0.0) ** 2).sum(dim=-1, keepdim=True).div(count).sqrt()
    remove = scores < scores.amax(dim=-1, keepdim=True) - n * sigma
    return scores.masked_fill(on & remove, -math.inf)


def epsilon(scores, cutoff, on):
    """Epsilon sampling (Hewitt et al. 2022), as transformers' EpsilonLogitsWarper: drop tokens less
    likely than the cutoff, always keeping the top one."""
    remove = (scores.softmax(dim=-1) < cutoff) & (scores < scores.amax(dim=-1, keepdim=True))
    return scores.masked_fill(on & remove, -math.inf)


def eta(scores, cutoff, on):
    """Eta sampling (Hewitt et al. 2022), as transformers' EtaLogitsWarper: the cutoff is
    min(eta, sqrt(eta) x exp(-entropy)), always keeping the top token."""
    logp = scores.log_softmax(dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nansum(dim=-1, keepdim=True)
    cut = torch.minimum(cutoff, cutoff.sqrt() * torch.exp(-entropy))
    remove = (probs < cut) & (scores < scores.amax(dim=-1, keepdim=True))
    return scores.masked_fill(on & remove, -math.inf)


XTC_SALT = 0x5851F42D   # XTC's coin is its own stream of the row's noise, apart from sampling's


def xtc(scores, threshold, probability, seeds, step, on):
    """XTC, "exclude top choices" (p-e-w's method, as llama.cpp's): with the given probability per
    token, of the tokens at least `threshold` likely all but the least likely are removed (nothing
    when fewer than two are). Ties at that least probability are all kept. The coin is the row's
    own counter-based noise (seed, step), so it does not depend on the rest of the batch."""
    coin = uniform_noise(seeds, step, 1, salt=XTC_SALT)
    probs = scores.softmax(dim=-1)
    top = (probs >= threshold) & (scores > -math.inf)
    least = probs.where(top, math.inf).amin(dim=-1, keepdim=True)
    return scores.masked_fill(on & (coin <= probability) & top & (probs > least), -math.inf)


def mirostat(scores, mu, on):
    """Mirostat v2's truncation (Basu et al. 2021, as llama.cpp's mirostat v2): drop tokens whose
    surprise, -log2 p, is above the row's mu; the top token always stays. generate.py then moves mu
    by eta x (tau - the drawn token's surprise)."""
    surprise = -scores.log_softmax(dim=-1) / math.log(2)
    remove = (surprise > mu) & (scores < scores.amax(dim=-1, keepdim=True))
    return scores.masked_fill(on & remove, -math.inf)


def process(scores: torch.Tensor, rows: RowSettings, seen: torch.Tensor, counts: torch.Tensor,
            sequences: torch.Tensor, n_generated: torch.Tensor, eos_ids: list[int], warp: bool = True,
            mu: torch.Tensor | None = None) -> torch.Tensor:
    """Apply every row's processors to scores [rows, vocab] (logits, or log-probs for beams).

    `n_generated` is also the step of XTC's coin; `mu` [rows, 1] is Mirostat's state (by default
    its start, 2 tau). With warp=False only the processors greedy and beam rows use run."""
    scores = block_eos(scores.clone(), n_generated, rows.min_new_tokens, eos_ids)
    for name, on in rows.chain:
        if not warp and name not in ALL_ROWS:
            continue
        if name == "repetition":
            scores = repetition_penalty(scores, seen | (counts > 0), rows.repetition_penalty, on)
        elif name == "frequency_presence":
            scores = frequency_presence_penalty(scores, counts, rows.frequency_penalty, rows.presence_penalty, on)
        elif name == "no_repeat_ngram":
            scores = no_repeat_ngram(scores, sequences, on)
        elif name == "dry":
            scores = dry(scores, sequences, rows.dry_multiplier, rows.dry_base, rows.dry_allowed_length,
                         rows.breakers, on)
        elif name == "temperature":
            dynamic = on & rows.dynatemp
            scores = temperature(scores, torch.where(on, rows.temperature, 1.0), rows.dynatemp_range,
                                 rows.dynatemp_exponent, dynamic if bool(dynamic.any()) else None)
        elif name == "top_n_sigma":
            scores = top_n_sigma(scores, rows.top_n_sigma, on)
        elif name == "top_k":
            scores = top_k(scores, rows.top_k, on)
        elif name == "top_p":
            scores = top_p(scores, rows.top_p, on)
        elif name == "min_p":
            scores = min_p(scores, rows.min_p, on)
        elif name == "typical_p":
            scores = typical(scores, rows.typical_p, on)
        elif name == "epsilon":
            scores = epsilon(scores, rows.epsilon_cutoff, on)
        elif name == "eta":
            scores = eta(scores, rows.eta_cutoff, on)
        elif name == "xtc":
            scores = xtc(scores, rows.xtc_threshold, rows.xtc_probability, rows.seeds, n_generated, on)
        elif name == "mirostat":
            scores = mirostat(scores, 2 * rows.mirostat_tau if mu is None else mu, on)
    return scores


def mirostat_update(mu: torch.Tensor, rows: RowSettings, sampled_logprob: torch.Tensor) -> torch.Tensor:
    """Mirostat's mu after a token of log-probability `sampled_logprob` [rows, 1] (under the
    distribution it was drawn from): mu - eta x (its surprise in bits - tau)."""
    surprise = -sampled_logprob / math.log(2)
    return mu - rows.mirostat_eta * (surprise - rows.mirostat_tau)


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


def uniform_noise(seeds: torch.Tensor, step: torch.Tensor, vocab: int, salt: int = 0) -> torch.Tensor:
    """Uniform numbers in (0, 1), [rows, vocab], that depend only on (seed, step, token id).

    A row's draws are thus the same whatever else shares the batch, and on any device. A `salt`
    gives another stream of the same row (XTC's coin), independent of sampling's.
    """
    key = _hash32(_hash32(seeds ^ (seeds >> 32)) ^ _hash32(step + 0x9E3779B9))
    if salt:
        key = _hash32(key ^ salt)
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
