"""The arena: Bradley–Terry ratings of decoding presets (and models) from the rankings in the store.

Every ranking or vote in the compare view is a set of battles: a ranking of k candidates gives its
k(k-1)/2 pairs, each a win, a loss or a tie (equal ranks). A pair of candidates with the same preset
is no battle, and neither is a pair a "best" vote left unjudged (two runners-up). The ratings are
the Bradley–Terry fit, P(i beats j) = σ(θi − θj), with a tie counted as half a win for each side
(as FastChat's leaderboard does), on FastChat's Elo-like scale: rating = 400/ln10 · θ + 1000, so
400 points are 10:1 odds. The ratings are anchored so that their mean is 1000 (or a named preset's
rating is 1000). Confidence intervals: the battles resampled with replacement, refit, 2.5 and 97.5
percentiles, from a fixed seed so the same store gives the same table.

A preset is the settings object (canonical JSON of the decoding settings that differ from
`Settings()`'s defaults; the seed is left out, since every candidate has its own), the model, or
both ("settings @ model"). This module is pure Python and numpy: the app imports it, never torch.
"""
import itertools
import json
import math
from dataclasses import dataclass

import numpy as np

from engine.errors import ParleyError
from engine.settings import FIELDS, Settings

SCALE = 400 / math.log(10)   # FastChat's: a rating difference of 400 is 10:1 odds
MEAN_RATING = 1000
BY = ("settings", "model", "both")
_DEFAULTS = Settings().to_dict()


@dataclass
class ArenaConfig:
    by: str = "both"             # what a preset is: settings, model, or both ("settings @ model")
    rounds: int = 1000           # bootstrap resamples behind the 95% intervals
    seed: int = 0                # of the resampling: the same battles give the same table
    anchor: str | None = None    # a preset's label: its rating is 1000 (default: the mean is 1000)
    # Each preset is counted as having tied this many times with a preset at the mean: without it a
    # preset that won (or lost) all its battles has no finite rating, and every small bootstrap
    # resample has one. Its pull fades as real battles add up; 0 gives the plain maximum likelihood.
    virtual_ties: float = 1.0

    def check(self) -> "ArenaConfig":
        if self.by not in BY:
            raise ParleyError(f"--by {self.by!r} is not one of {', '.join(BY)}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= 100_000:
            raise ParleyError(f"--rounds {self.rounds!r} is out of range: give a whole number from 1 to 100000")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ParleyError(f"--seed {self.seed!r} is out of range: give a whole number from 0 up")
        if not self.virtual_ties >= 0:
            raise ParleyError(f"virtual_ties = {self.virtual_ties!r} must be 0 or more")
        return self


@dataclass(frozen=True)
class Preset:
    settings: str | None   # canonical JSON of the non-default settings; None when presets are models only
    model: str | None      # None when presets are settings only

    @property
    def label(self) -> str:
        """`temperature=0.3 top_k=20 @ model`: one line, the same for the same preset."""
        parts = []
        if self.settings is not None:
            changed = json.loads(self.settings)
            parts.append(" ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in changed.items())
                         or "defaults")
        if self.model is not None:
            parts.append(self.model)
        return " @ ".join(parts)

    def settings_dict(self) -> dict | None:
        """The non-default settings; `Settings(**them)` is the whole preset (seed unset)."""
        return None if self.settings is None else json.loads(self.settings)


@dataclass(frozen=True)
class Battle:
    a: Preset
    b: Preset
    score: float   # a's: 1 a won, 0 b won, 0.5 a tie


@dataclass
class Rating:
    rank: int
    preset: Preset
    rating: float
    low: float          # the 95% interval
    high: float
    battles: int
    win_rate: float     # ties count half

    def to_dict(self) -> dict:
        return {"rank": self.rank, "preset": self.preset.label, "settings": self.preset.settings_dict(),
                "model": self.preset.model, "rating": round(self.rating, 2), "ci_low": round(self.low, 2),
                "ci_high": round(self.high, 2), "battles": self.battles, "win_rate": round(self.win_rate, 4)}


def changed_settings(settings: dict) -> str:
    """Canonical JSON of the settings that differ from the defaults, seed left out. A float field
    is compared as a float, so 1 and 1.0 (as JSON may hold them) are one preset."""
    changed = {}
    for name, value in settings.items():
        if name == "seed":
            continue
        kind = FIELDS.get(name, (None,))[0]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if name not in _DEFAULTS or value != _DEFAULTS[name]:
            changed[name] = value
    return json.dumps(changed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def preset_of(message: dict, by: str) -> Preset | None:
    """The preset a stored reply was generated with; None when it cannot be told (no settings or
    model recorded, or settings changed while it was generated, which makes it no one preset)."""
    settings = model = None
    if by in ("settings", "both"):
        if not message.get("settings") or len(message.get("segments") or []) > 1:
            return None
        settings = changed_settings(message["settings"])
    if by in ("model", "both"):
        if not message.get("model"):
            return None
        model = message["model"]
    return Preset(settings, model)


def judged_pairs(store):
    """(ranking, x, y, x's score: 1 won, 0 lost, 0.5 tied) for every pair of candidates a ranking or
    vote judged, oldest ranking first; a "best" vote leaves its runners-up unjudged, not tied."""
    comparisons = {}
    for ranking in store.rankings():
        cid = ranking["comparison_id"]
        if cid not in comparisons:
            comparisons[cid] = store.comparison(cid)["candidates"]
        candidates, ranks = comparisons[cid], ranking["ranks"]
        unjudged_ties = ranking["kind"] == "vote" and ranking["vote"] == "best"
        for x, y in itertools.combinations(candidates, 2):
            ra, rb = ranks[x["id"]], ranks[y["id"]]
            if ra == rb and unjudged_ties:
                continue
            yield ranking, x, y, 1.0 if ra < rb else 0.0 if ra > rb else 0.5


def battles(store, by: str = "both") -> list[Battle]:
    """Every battle in the store's rankings and votes, oldest ranking first."""
    out = []
    for _, x, y, score in judged_pairs(store):
        a, b = preset_of(x, by), preset_of(y, by)
        if a is not None and b is not None and a != b:
            out.append(Battle(a, b, score))
    return out


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))   # never overflows


def fit(wins: np.ndarray, virtual_ties: float = 1.0) -> np.ndarray:
    """θ (natural-log strengths; mean 0 without virtual ties, whose opponent is θ = 0) maximising Σ wins[i, j] · log σ(θi − θj), plus each
    preset's `virtual_ties` half wins and half losses against θ = 0, by Newton's method on the
    log-likelihood with step halving. `wins[i, j]`: i's wins over j, ties counted half to each."""
    n = len(wins)
    games = wins + wins.T
    if not virtual_ties and not _finite(wins):
        raise ParleyError("the ratings have no finite maximum (a preset won, or lost, every battle against the "
                          "others it met): fit them with virtual_ties > 0")
    theta = np.zeros(n)

    def loglik(t):
        d = t[:, None] - t[None, :]
        return -(wins * np.logaddexp(0, -d)).sum() - virtual_ties * 0.5 * (np.logaddexp(0, -t) + np.logaddexp(0, t)).sum()

    current = loglik(theta)
    tolerance = 1e-9 * max(1.0, games.sum())
    for _ in range(200):
        p = _sigmoid(theta[:, None] - theta[None, :])
        grad = (wins - games * p).sum(1)
        w = games * p * (1 - p)
        curvature = np.diag(w.sum(1)) - w        # minus the Hessian: positive semidefinite
        q = _sigmoid(theta)
        grad += virtual_ties * (0.5 - q)
        curvature += np.diag(virtual_ties * q * (1 - q))
        if np.abs(grad).max() < tolerance:
            return theta
        # least squares: without virtual ties the curvature is singular along "all θ up by one"
        step = np.linalg.lstsq(curvature, grad, rcond=None)[0]
        for _ in range(50):
            candidate = theta + step
            value = loglik(candidate)
            if value >= current - 1e-12 * abs(current):
                break
            step = step / 2
        theta, current = candidate, value
    raise ParleyError("the ratings fit did not converge in 200 Newton steps: report this with the store's rankings")


def _finite(wins: np.ndarray) -> bool:
    """Whether the plain maximum likelihood is finite (Hunter 2004's condition): within each group of
    presets that met, every one beat (or tied), through some chain, every other."""
    beat = (wins > 0) | np.eye(len(wins), dtype=bool)
    met = beat | beat.T
    for k in range(len(wins)):   # transitive closures (Floyd–Warshall)
        beat = beat | (beat[:, k:k + 1] & beat[k:k + 1, :])
        met = met | (met[:, k:k + 1] & met[k:k + 1, :])
    return bool((beat | ~met).all())


def _wins(kinds: list[tuple[int, int, float]], counts: np.ndarray, n: int) -> np.ndarray:
    wins = np.zeros((n, n))
    for (i, j, score), c in zip(kinds, counts):
        wins[i, j] += c * score
        wins[j, i] += c * (1 - score)
    return wins


def _anchored(theta: np.ndarray, present: np.ndarray, anchor: int | None) -> np.ndarray:
    rating = SCALE * theta
    shift = rating[anchor] if anchor is not None else rating[present].mean()
    out = rating - shift + MEAN_RATING
    out[~present] = np.nan
    return out


def rate(fights: list[Battle], config: ArenaConfig | None = None) -> list[Rating]:
    """The ratings table of the battles, best first; presets without battles are not in it."""
    config = (config or ArenaConfig()).check()
    presets = sorted({p for b in fights for p in (b.a, b.b)}, key=lambda p: p.label)
    if not presets:
        return []
    index = {p: i for i, p in enumerate(presets)}
    n = len(presets)
    anchor = None
    if config.anchor is not None:
        anchor = next((i for p, i in index.items() if p.label == config.anchor), None)
        if anchor is None:
            raise ParleyError(f"--anchor {config.anchor!r} is no preset with battles: use a preset as the table "
                              "names it")
    # the battles as counts of distinct (a, b, score) kinds: a bootstrap resample is a multinomial draw
    tally: dict[tuple[int, int, float], int] = {}
    for b in fights:
        key = (index[b.a], index[b.b], b.score)
        tally[key] = tally.get(key, 0) + 1
    kinds, counts = list(tally), np.array(list(tally.values()), dtype=float)
    wins = _wins(kinds, counts, n)
    games = wins + wins.T
    everyone = np.ones(n, dtype=bool)
    estimate = _anchored(fit(wins, config.virtual_ties), everyone, anchor)

    rng = np.random.default_rng(config.seed)
    draws = rng.multinomial(len(fights), counts / counts.sum(), size=config.rounds)
    samples = np.full((config.rounds, n), np.nan)
    for r, drawn in enumerate(draws):
        w = _wins(kinds, drawn, n)
        present = (w + w.T).sum(1) > 0
        if anchor is not None and not present[anchor]:
            continue   # the anchor sat this resample out: it says nothing on that scale
        # a resample can leave a preset unbeaten even where the data do not: with no virtual ties
        # its rating has no finite value, and the resample is left out
        try:
            samples[r] = _anchored(fit(w, config.virtual_ties), present, anchor)
        except ParleyError:
            continue
    low, high = np.nanpercentile(samples, [2.5, 97.5], axis=0)
    order = sorted(range(n), key=lambda i: (-estimate[i], presets[i].label))
    return [Rating(rank, presets[i], float(estimate[i]), float(low[i]), float(high[i]), round(float(games[i].sum())),
                   float(wins[i].sum() / games[i].sum())) for rank, i in enumerate(order, 1)]


def ratings(store, config: ArenaConfig | None = None) -> list[Rating]:
    """The arena's table from the store's rankings."""
    config = (config or ArenaConfig()).check()
    return rate(battles(store, config.by), config)


def table(rows: list[Rating]) -> str:
    """The ratings as aligned text: rank, preset, rating, 95% CI, battles, win rate."""
    head = ("rank", "preset", "rating", "95% CI", "battles", "win rate")
    lines = [head] + [(str(r.rank), r.preset.label, f"{r.rating:.0f}", f"{r.low:.0f} to {r.high:.0f}",
                       str(r.battles), f"{100 * r.win_rate:.0f}%") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)


# -- the reward model against the user ---------------------------------------------------------------
@dataclass
class Agreement:
    """How often a reward model orders a pair of candidates as the user's ranking did."""
    share: float | None   # agreeing pairs / pairs (the reward model's own ties count half); None: no pairs
    low: float | None     # the 95% interval: rankings resampled with replacement
    high: float | None
    pairs: int            # pairs the user ordered (ties left out) and the reward model scored
    rankings: int         # rankings those pairs come from
    trained: int | None   # rankings left out as the reward model's training data; None: it records none
    unscored: int         # pairs left out because a candidate is too long for the reward model

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}

    @property
    def line(self) -> str:
        held = ("held out (the reward model's own training rankings left out)" if self.trained is not None else
                "not known to be held out: this reward model records no training rankings, so all count")
        if self.share is None:
            return f"reward model agreement: no ranked pair to check ({held})"
        extra = f"; {self.unscored} pairs too long to score" if self.unscored else ""
        return (f"reward model agrees with your rankings on {100 * self.share:.0f}% of pairs (95% CI "
                f"{100 * self.low:.0f} to {100 * self.high:.0f}%; {self.pairs} pairs from {self.rankings} rankings, "
                f"{held}{extra})")


def agreement_candidates(store, trained: set[str] | None) -> dict[str, dict]:
    """{message id: candidate} of every ranking a reward model did not train on: what it must score."""
    return {m["id"]: m for ranking, x, y, score in judged_pairs(store) if score != 0.5
            and ranking["id"] not in (trained or ()) for m in (x, y)}


def agreement(store, scores: dict[str, float | None], trained: set[str] | None,
              config: ArenaConfig | None = None) -> Agreement:
    """The share of the user's ordered pairs (ties left out) that `scores` (message id: the reward
    model's score, None where it could not score it) order the same way, over the rankings not in
    `trained`; its 95% interval resamples whole rankings, since one ranking's pairs share a prompt
    and a judgement, with the arena's rounds and seed."""
    config = (config or ArenaConfig()).check()
    tallies: dict[str, list[float]] = {}   # ranking id: [agreeing, pairs]
    left_out, unscored = set(), 0
    for ranking, x, y, score in judged_pairs(store):
        if score == 0.5:
            continue
        if trained is not None and ranking["id"] in trained:
            left_out.add(ranking["id"])
            continue
        sx, sy = scores.get(x["id"]), scores.get(y["id"])
        if sx is None or sy is None:
            unscored += 1
            continue
        tally = tallies.setdefault(ranking["id"], [0.0, 0])
        tally[0] += 0.5 if sx == sy else float((sx > sy) == (score == 1.0))
        tally[1] += 1
    trained_count = None if trained is None else len(left_out)
    if not tallies:
        return Agreement(None, None, None, 0, 0, trained_count, unscored)
    agree, pairs = np.array(list(tallies.values())).T
    rng = np.random.default_rng(config.seed)
    draws = rng.integers(0, len(agree), size=(config.rounds, len(agree)))
    low, high = np.percentile(agree[draws].sum(1) / pairs[draws].sum(1), [2.5, 97.5])
    return Agreement(float(agree.sum() / pairs.sum()), float(low), float(high), int(pairs.sum()), len(tallies),
                     trained_count, unscored)
