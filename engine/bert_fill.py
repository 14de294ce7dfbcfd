"""A BERT "generating": a reply of L tokens filled into [CLS] prompt [SEP] [MASK]*L [SEP], round by round.

BERT is no left-to-right model (engine/models/bert.py), so it writes a reply the way Wang & Cho
(2019, "BERT has a mouth, and it must speak") generate from a masked LM: start from all masks and
fill them one position at a time, each time conditioning on everything filled so far. Which
positions go first follows mask-predict (Ghazvininejad et al. 2019): the most confident ones,
`per_round` a round, so L / per_round rounds in all; mask-predict's re-masking of low-confidence
tokens is left out, so a filled token never changes. Greedy (temperature 0) takes each position's
most likely token and fills the positions whose top probability is highest; sampling draws every
masked position's token through engine/sampling.py's processors, with the candidate's own
reproducible noise, and fills those whose drawn token was most likely.

`MaskFilling` streams as engine/generate.py's Generation does: a `Token` per filled position (its
`step` is the position in the reply, its `snapshot` the reply so far, masks as "_"), then a
`Finished` per candidate; `cancel` stops between rounds.
"""
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine import sampling
from engine.errors import ParleyError
from engine.generate import Alternative, Finished, Token, _random_seed
from engine.settings import FIELDS, Settings

LABEL = "mask filling (BERT)"
PLACEHOLDER = "_"   # an unfilled position, in the snapshots
# settings with no meaning here: they read the text to the left of a token (penalties, n-grams, DRY,
# stop strings, an end-of-text to block), keep state from token to token (Mirostat) or search (beams)
UNUSED = ("repetition_penalty", "frequency_penalty", "presence_penalty", "no_repeat_ngram_size", "dry_multiplier",
          "num_beams", "min_new_tokens", "mirostat_tau", "stop")


def unused(settings: Settings) -> list[str]:
    """The settings a mask filling ignores that are set to something other than off."""
    off = {name: FIELDS[name][1].neutral for name in UNUSED}
    off["stop"] = []
    return [name for name in UNUSED if getattr(settings, name) != off[name]]


def note(settings: Settings) -> str:
    """One line saying that this candidate is filled, not written left to right, and what it ignores."""
    ignored = unused(settings)
    return LABEL + (f"; not used: {', '.join(ignored)}" if ignored else "")


@dataclass
class MaskFiller:
    """A loaded BERT seen as the app's models are (tokenizer, max_context, device, config), to fill replies."""
    model: object
    tokenizer: object
    path: Path

    fills_masks = True   # what tells Replies and the CLI to fill instead of generate

    def __post_init__(self):
        from engine.models.bert import special_ids
        tok = self.tokenizer
        ids = special_ids(tok, "cls_token", "sep_token", "mask_token")
        self.cls_id, self.sep_id, self.mask_id = ids
        pad = tok.token_id(tok.special_tokens.get("pad_token"))
        self.banned = sorted({*ids, *([pad] if pad is not None else [])})   # never a reply's token
        self.max_context = self.model.config.max_position_embeddings
        self.config = {**self.model.config.to_hf(), "model_type": "bert"}
        weight = self.model.bert.embeddings.word_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """A conversation as BERT was trained on text: the messages' contents, one a line, no chat template."""
        from engine.train.mlm import text_of
        return self.tokenizer.encode(text_of(messages), add_special_tokens=False)

    def reply_length(self, n_prompt: int, max_new_tokens: int) -> int:
        """L: max_new_tokens, capped so that the reply and (at least half the room or all of) the prompt fit."""
        room = self.max_context - 3   # [CLS], [SEP] and [SEP]
        if room < 1:
            raise ParleyError(f"{self.path}: a BERT of {self.max_context} positions has no room for a reply")
        return max(1, min(max_new_tokens, room - min(n_prompt, room // 2)))


def load(path: str | Path, device: str | None = None) -> MaskFiller:
    from engine.device import pick_device
    from engine.models import bert
    model, tokenizer = bert.load(path, pick_device(device))
    return MaskFiller(model, tokenizer, Path(path))


def is_bert_dir(path: Path) -> bool:
    from engine.checkpoint import read_json
    config = read_json(path / "config.json", required=False) if path.is_dir() else None
    return (config or {}).get("model_type") == "bert"


class MaskFilling:
    """An iterator of `Token` and `Finished` events: each candidate's reply filled in; see the module docstring."""

    def __init__(self, filler: MaskFiller, prompt_ids: list[int], settings: list[Settings], per_round: int = 1,
                 top_alternatives: int = 5):
        if not settings:
            raise ParleyError("no candidates to fill: give at least one settings object")
        if per_round < 1:
            raise ParleyError(f"per_round = {per_round}: fill at least one position a round")
        self.filler, self.per_round, self.top_n = filler, per_round, top_alternatives
        length = max(filler.reply_length(len(prompt_ids), s.max_new_tokens) for s in settings)
        self.settings = [replace(s.validate(), seed=s.seed if s.seed is not None else _random_seed(),
                                 max_new_tokens=filler.reply_length(len(prompt_ids), s.max_new_tokens))
                         for s in settings]
        keep = filler.max_context - 3 - length
        self.prompt = list(prompt_ids)[-keep:] if keep > 0 else []   # the oldest text goes first
        self._cancel: set[int] = set()

    def cancel(self, candidate: int | None = None) -> None:
        self._cancel.update(range(len(self.settings)) if candidate is None else [candidate])

    def update(self, candidate: int, settings: Settings) -> None:
        raise ParleyError(f"{LABEL}: settings cannot change while the masks fill: run it again")

    def run(self) -> list[Finished]:
        return sorted((e for e in self if isinstance(e, Finished)), key=lambda f: f.candidate)

    def __iter__(self):
        """A round of every live candidate in turn, so that side by side all replies form together."""
        started = time.perf_counter()
        rows = {c: self._start(s) for c, s in enumerate(self.settings)}
        rounds = dict.fromkeys(rows, 0)
        while rows:
            for c in list(rows):
                if c in self._cancel:
                    yield self._finished(c, rows.pop(c), "cancelled", rounds[c], started)
                    continue
                yield from self._round(c, rows[c], rounds[c])
                rounds[c] += 1
                if not (rows[c] == self.filler.mask_id).any():
                    yield self._finished(c, rows.pop(c), "length", rounds[c], started)

    def _start(self, s: Settings) -> torch.Tensor:
        f = self.filler
        ids = [f.cls_id, *self.prompt, f.sep_id, *[f.mask_id] * s.max_new_tokens, f.sep_id]
        return torch.tensor(ids, device=f.device)

    @torch.inference_mode()
    def _round(self, c: int, ids: torch.Tensor, round_: int):
        """Fill the `per_round` most confident masked positions of candidate c's row `ids` (in place)."""
        f, s = self.filler, self.settings[c]
        masked = (ids == f.mask_id).nonzero()[:, 0]
        logits = f.model(ids[None])[0, masked].float()
        logits[:, f.banned] = -float("inf")
        logprobs = logits.log_softmax(-1)
        start = len(self.prompt) + 2   # the reply's first position in the row
        if s.strategy == "greedy":
            scores = logits
            chosen = logits.argmax(-1)
        else:
            n = len(masked)
            rows = sampling.RowSettings([replace(s, **{k: FIELDS[k][1].neutral for k in UNUSED[:-1]})] * n,
                                        f.device, f.tokenizer)
            # each position's own noise, new every round: (seed, round, position) picks it (XTC's coin too);
            # no end-of-text to block and, with the penalties off, no counts or seen tokens to read
            step = round_ * f.max_context + masked
            scores = sampling.process(logits, rows, torch.zeros_like(logits, dtype=torch.bool),
                                      torch.zeros_like(logits), ids[None].expand(n, -1), step[:, None], [])
            chosen = sampling.sample(scores, rows.seeds, step)
        confidence = scores.log_softmax(-1).gather(1, chosen[:, None])[:, 0]
        take = confidence.topk(min(self.per_round, len(masked))).indices
        take = take[masked[take].argsort()]   # within a round, left to right
        ids[masked[take]] = chosen[take]
        snapshot = self._text(ids[start:-1])
        for i in take.tolist():
            token = int(chosen[i])
            yield Token(candidate=c, step=int(masked[i]) - start, token_id=token,
                        text=f.tokenizer.decode([token]), logprob=float(logprobs[i, token]),
                        sampled_logprob=float(confidence[i]),
                        top_before=self._top(logprobs[i]), top_after=self._top(scores[i].log_softmax(-1)),
                        piece=f.tokenizer.decode([token], skip_special_tokens=False), snapshot=snapshot)

    def _top(self, logprobs: torch.Tensor) -> list[Alternative]:
        if not self.top_n:
            return []
        top = logprobs.topk(min(self.top_n, len(logprobs)))
        return [Alternative(int(i), self.filler.tokenizer.decode([int(i)], skip_special_tokens=False), float(p))
                for p, i in zip(top.values.exp().tolist(), top.indices.tolist()) if p > 0]

    def _text(self, reply: torch.Tensor) -> str:
        """The reply so far: each run of filled tokens decoded, a placeholder per mask."""
        out, run = [], []
        for token in reply.tolist():
            if token == self.filler.mask_id:
                out += [self.filler.tokenizer.decode(run), PLACEHOLDER]
                run = []
            else:
                run.append(token)
        return "".join(out + [self.filler.tokenizer.decode(run)])

    def _finished(self, c: int, ids: torch.Tensor, reason: str, rounds: int, started: float) -> Finished:
        reply = ids[len(self.prompt) + 2:-1]
        filled = [t for t in reply.tolist() if t != self.filler.mask_id]
        s = self.settings[c]
        return Finished(candidate=c, finish_reason=reason, text=self._text(reply), token_ids=filled, settings=s,
                        timings={"total_s": time.perf_counter() - started, "rounds": rounds}, segments=[(0, s)])
