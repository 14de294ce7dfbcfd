"""Decoding settings: the `Settings` dataclass, what each field means, presets and prompt templates.

This module imports no torch, so the app can draw its first frame while the engine still loads.
Each field carries its metadata (help, range, the value that turns it off), and everything that
reads settings from a person is derived from it: validation here, the CLI flags
(`engine/cli.py`), the app's settings panel and the compare screen's `name=value` overrides.
"""
import math
from dataclasses import asdict, dataclass, field, fields

from engine.errors import ParleyError


@dataclass(frozen=True)
class Knob:
    """What a field of `Settings` is, for validation and for every place that asks for one."""
    help: str
    rule: str = ""                          # the allowed range in words, shown in errors
    low: float | None = None                # allowed range; open ends when *_open
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    neutral: object = None                  # the value that turns the option off, if it has one
    panel: bool = True                      # shown in the app's settings panel


def knob(default, help: str, **meta):
    return field(default=default, metadata={"knob": Knob(help, **meta)})


# The samplers `sampler_order` arranges (engine/sampling.py applies them). "penalties" is the
# repetition penalty then the frequency and presence penalties (llama.cpp's "penalties" sampler);
# "temperature" is dynamic when dynatemp_range > 0. The first three act on greedy and beam rows too.
SAMPLERS = ("penalties", "no_repeat_ngram", "dry", "temperature", "top_n_sigma", "top_k", "top_p", "min_p",
            "typical_p", "epsilon", "eta", "xtc", "mirostat")
DEFAULT_ORDER = ",".join(SAMPLERS)   # transformers' order for its samplers (with OpenAI's penalties after
                                     # the repetition one), the others where llama.cpp puts them


def parse_order(text: str) -> tuple[str, ...]:
    """Every sampler in the order it runs: the named ones first, the rest in the default order."""
    if not isinstance(text, str):
        raise ParleyError(f"sampler_order = {text!r} is not text: name samplers from {', '.join(SAMPLERS)}, "
                          "comma-separated")
    named = [name.strip() for name in text.split(",") if name.strip()]
    for i, name in enumerate(named):
        if name not in SAMPLERS:
            raise ParleyError(f"sampler_order names {name!r}, which is no sampler: use names from "
                              f"{', '.join(SAMPLERS)}")
        if name in named[:i]:
            raise ParleyError(f"sampler_order names {name!r} twice: name each sampler at most once")
    return tuple(named) + tuple(s for s in SAMPLERS if s not in named)


@dataclass
class Settings:
    """How one candidate is decoded. Temperature 0 means greedy; num_beams > 1 means beam search."""
    temperature: float = knob(0.8, "0 = greedy; sampling divides logits by it",
                              rule="between 0 (greedy) and 100", low=0, high=100, neutral=1.0)
    top_k: int = knob(40, "keep the k most likely tokens (0 = off)", rule="0 (off) or more", low=0, neutral=0)
    top_p: float = knob(0.95, "keep the smallest set with this much probability (1 = off)",
                        rule="in (0, 1]; 1 turns it off", low=0, high=1, low_open=True, neutral=1.0)
    min_p: float = knob(0.05, "drop tokens below min_p x the top token's probability (0 = off)",
                        rule="in [0, 1]; 0 turns it off", low=0, high=1, neutral=0.0)
    typical_p: float = knob(1.0, "locally typical sampling mass (1 = off)",
                            rule="in (0, 1]; 1 turns it off", low=0, high=1, low_open=True, neutral=1.0)
    repetition_penalty: float = knob(1.0, "transformers' rule over prompt + output (1 = off)",
                                     rule="greater than 0; 1 turns it off", low=0, low_open=True, neutral=1.0)
    frequency_penalty: float = knob(0.0, "OpenAI's rule over output tokens: minus this x count",
                                    rule="between -2 and 2", low=-2, high=2, neutral=0.0)
    presence_penalty: float = knob(0.0, "OpenAI's rule over output tokens: minus this if present",
                                   rule="between -2 and 2", low=-2, high=2, neutral=0.0)
    no_repeat_ngram_size: int = knob(0, "never repeat an n-gram of this size (0 = off)",
                                     rule="0 (off) or more", low=0, neutral=0)
    num_beams: int = knob(1, "beam search with this many beams (1 = off)", rule="1 or more", low=1, neutral=1)
    length_penalty: float = knob(1.0, "beam score = sum log p / length ** this", neutral=1.0, panel=False)
    early_stopping: bool | str = knob(False, "beam search stops: true, false or 'never', as in transformers",
                                      rule="true, false or 'never'", panel=False)
    num_return_sequences: int = knob(1, "beams returned (beam search only)", panel=False)
    max_new_tokens: int = knob(256, "most tokens to write", rule="1 or more", low=1)
    min_new_tokens: int = knob(0, "end-of-text is blocked before this many tokens", neutral=0)
    # The samplers of llama.cpp and text-generation-webui beyond transformers' classic ones.
    dry_multiplier: float = knob(0.0, "DRY: penalty for extending a repeated sequence (0 = off)",
                                 rule="0 (off) or more", low=0, neutral=0.0)
    dry_base: float = knob(1.75, "DRY: penalty = multiplier x base ** (repeat length - allowed length)",
                           rule="1 or more", low=1)
    dry_allowed_length: int = knob(2, "DRY: repeats this long or shorter go unpenalised",
                                   rule="0 or more", low=0)
    dry_sequence_breakers: list[str] = field(default_factory=lambda: ["\n", ":", "\"", "*"], metadata={"knob": Knob(
        "DRY: a repeat never runs across a token containing one of these (repeatable)",
        rule="a list of non-empty strings", panel=False)})
    xtc_threshold: float = knob(0.1, "XTC: tokens at least this likely are the top choices it removes",
                                rule="in [0, 0.5]", low=0, high=0.5)
    xtc_probability: float = knob(0.0, "XTC: chance per token of removing all top choices but the least (0 = off)",
                                  rule="in [0, 1]; 0 turns it off", low=0, high=1, neutral=0.0)
    top_n_sigma: float = knob(0.0, "keep tokens within n standard deviations of the top logit (0 = off)",
                              rule="0 (off) or more", low=0, neutral=0.0)
    epsilon_cutoff: float = knob(0.0, "drop tokens less likely than this (0 = off)",
                                 rule="in [0, 1); 0 turns it off", low=0, high=1, high_open=True, neutral=0.0)
    eta_cutoff: float = knob(0.0, "drop tokens below min(eta, sqrt(eta) x exp(-entropy)) (0 = off)",
                             rule="in [0, 1); 0 turns it off", low=0, high=1, high_open=True, neutral=0.0)
    dynatemp_range: float = knob(0.0, "dynamic temperature: temperature +/- this, by the entropy (0 = off)",
                                 rule="0 (off) or more", low=0, neutral=0.0)
    dynatemp_exponent: float = knob(1.0, "dynamic temperature: normalised entropy ** this picks the temperature",
                                    rule="greater than 0", low=0, low_open=True)
    mirostat_tau: float = knob(0.0, "Mirostat v2: target surprise in bits (0 = off; 5 is usual)",
                               rule="0 (off) or more", low=0, neutral=0.0)
    mirostat_eta: float = knob(0.1, "Mirostat v2: learning rate of its threshold",
                               rule="in (0, 1]", low=0, high=1, low_open=True)
    sampler_order: str = knob(DEFAULT_ORDER, "the samplers' order, comma-separated; unnamed ones follow in "
                              "the default order", rule=f"names from {', '.join(SAMPLERS)}, each once")
    stop: list[str] = field(default_factory=list, metadata={"knob": Knob(
        "stop before this text (repeatable)", rule="a list of non-empty strings", panel=False)})
    seed: int | None = knob(None, "candidate i is seeded seed + i; empty = a random seed, recorded",
                            rule="a whole number from 0 to 2**63 - 1", low=0, high=2**63, high_open=True)

    @property
    def strategy(self) -> str:
        return "beam" if self.num_beams > 1 else "greedy" if self.temperature == 0 else "sample"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ParleyError(f"unknown decoding setting {unknown[0]!r}: use one of {', '.join(sorted(FIELDS))}")
        return cls(**data).validate()

    def validate(self) -> "Settings":
        for name, (kind, k) in FIELDS.items():
            value = getattr(self, name)
            if name in ("stop", "dry_sequence_breakers"):
                if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
                    _bad(self, name, k.rule)
                continue
            if name == "sampler_order":
                parse_order(value)
                continue
            if name == "early_stopping":
                if value not in (True, False, "never"):
                    _bad(self, name, k.rule)
                continue
            if value is None and name == "seed":
                continue
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                _bad(self, name, k.rule if name == "seed" else "a whole number")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)):
                _bad(self, name, "a number")
            if not in_range(k, value):
                _bad(self, name, k.rule)
        if not 1 <= self.num_return_sequences <= self.num_beams:
            _bad(self, "num_return_sequences", f"between 1 and num_beams ({self.num_beams})")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            _bad(self, "min_new_tokens", f"between 0 and max_new_tokens ({self.max_new_tokens})")
        return self


def in_range(k: Knob, value) -> bool:
    above = k.low is None or (value > k.low if k.low_open else value >= k.low)
    below = k.high is None or (value < k.high if k.high_open else value <= k.high)
    return above and below


def _bad(settings: Settings, name: str, rule: str):
    raise ParleyError(f"{name} = {getattr(settings, name)!r} is out of range: it must be {rule}")


# name: (float, int or None for the others, Knob) for every field, in the dataclass's order
FIELDS: dict[str, tuple[type | None, Knob]] = {
    f.name: (float if f.type is float else int if f.type in (int, int | None) else str if f.type is str else None,
             f.metadata["knob"])
    for f in fields(Settings)}

# what the settings panel edits, in order
PANEL_FIELDS = tuple(name for name, (_, k) in FIELDS.items() if k.panel)


def parse_value(name: str, text: str):
    """One setting from text, as typed in the panel, a compare override or a CLI flag."""
    if name not in FIELDS:
        raise ParleyError(f"unknown decoding setting {name!r}: use one of {', '.join(sorted(FIELDS))}")
    kind = FIELDS[name][0]
    if kind is str:
        return text
    try:
        return float(text) if kind is float else int(text)
    except ValueError:
        raise ParleyError(f"{name} takes a number{'' if kind is float else ', a whole one'}, not {text!r}") from None


PRESETS = {
    "balanced": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "precise": dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
    "creative": dict(temperature=1.2, top_k=0, top_p=0.98, min_p=0.02),
    "beam": dict(temperature=0.0, num_beams=4, length_penalty=1.0),
}

# the temperature of each compare pane, in order: spread around 1 so that side by side the panes
# show what temperature does (pane i's own overrides come on top)
COMPARE_TEMPERATURES = (0.3, 0.7, 1.0, 1.3, 0.5, 1.6)

# prompt templates the chat screen cycles through; {question} is what the user typed
TEMPLATES = {
    "zero-shot": "{question}",
    "few-shot": "Here are some examples:\n\nQ: {example question}\nA: {example answer}\n\nQ: {question}\nA:",
    "chain-of-thought": "{question}\n\nLet's think step by step.",
}


def segments(message: dict) -> list[dict]:
    """A stored reply's settings segments, [{"from": token index, "settings": {...}}], oldest first."""
    return message.get("segments") or [{"from": 0, "settings": message["settings"]}]


def settings_at(message: dict, step: int) -> dict:
    """The settings a stored reply drew its token `step` with (its first ones for forced tokens)."""
    held = segments(message)
    return next((s["settings"] for s in reversed(held) if s["from"] <= step), held[0]["settings"])
