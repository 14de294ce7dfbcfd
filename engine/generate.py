"""Batched, streamed generation: several candidates with their own settings in one run.

A run holds one prompt shared by all candidates (the chat, the compare view) or several prompts,
each continued by its own candidates (`prompt_of`; RLHF rollouts, `generate_batch`). The prompts
are prefilled once, together: left-padded to one width, padding masked, each row's positions
counting its own tokens only. The cache rows are then repeated, one per sampled candidate and
`num_beams` per beam-search candidate, from its prompt's row. Each step runs one forward pass for
every live row, applies every row's own processors as tensors, and yields events: a `Token` per
sampled row and step, and a `Finished` per candidate. Between steps the caller may cancel
candidates or change their settings. Finished rows leave the batch, so the rest speed up.

The loop is laid out as gpt-fast's generate.py is: `prefill`, then per step `choose_tokens` (the
rows' processors and sampling), the beam searches' bookkeeping, the events, the pruning of
finished rows and `decode_step`, one forward pass: a pure function of tensors, ready for
torch.compile and CUDA graphs, while Python keeps everything that reads values back (events,
stop strings, beams). On a GPU the step is captured as a CUDA graph and replayed, its rows in
buckets of fixed shape (engine/graphs.py).
"""
import itertools
import os
import time
from dataclasses import dataclass, field, replace

import torch

from engine import graphs, sampling
from engine.beam import BeamSearch
from engine.errors import ParleyError
from engine.models.cache import KVCache
from engine.sampling import RowSettings
from engine.settings import Settings
from engine.stop import StopMatcher


@dataclass
class Alternative:
    token_id: int
    text: str
    prob: float


@dataclass
class Token:
    """One new token of one sampled candidate: what the app streams and the token inspector shows."""
    candidate: int
    step: int
    token_id: int
    text: str                  # new text to show; "" while a character or a possible stop string is incomplete
    logprob: float             # log-probability under the model, before this candidate's processors
    sampled_logprob: float     # log-probability under the distribution it was drawn from
    top_before: list[Alternative] = field(default_factory=list)  # the model's top tokens
    top_after: list[Alternative] = field(default_factory=list)   # the same after temperature, top-k, ... (p > 0)
    piece: str = ""            # the token's own text, special tokens shown (only with top_alternatives)
    snapshot: str | None = None  # the whole reply so far, where tokens come out of order (engine/bert_fill.py)


@dataclass
class Finished:
    candidate: int
    finish_reason: str         # "eos", "stop", "length" or "cancelled"
    text: str
    token_ids: list[int]       # generated ids only, the final EOS included
    settings: Settings
    timings: dict
    beams: list[dict] = field(default_factory=list)  # beam search: every returned sequence, best first
    prompt: int = 0            # the index of the prompt it continues (0 when the run has one prompt)
    segments: list[tuple[int, Settings]] = field(default_factory=list)  # (step, settings in force from it), in order


class Generation:
    """An iterator of `Token` and `Finished` events. See the module docstring."""

    def __init__(self, lm, prompt_ids: list[int] | list[list[int]], settings: list[Settings],
                 top_alternatives: int = 5, prompt_of: list[int] | None = None, static: bool | None = None):
        """`prompt_ids`: one prompt for every candidate, or several; then candidate c continues
        prompt `prompt_of[c]` (by default prompt c, one candidate each). `static`: decode with a
        fixed-shape step over rows in buckets (engine/graphs.py), captured as a CUDA graph on a GPU;
        by default on CUDA, for the models with a KV cache."""
        several = bool(prompt_ids) and isinstance(prompt_ids[0], (list, tuple))
        prompts = [list(p) for p in prompt_ids] if several else [list(prompt_ids)]
        if not settings:
            raise ParleyError("no candidates to generate: give at least one settings object")
        if prompt_of is None and not several:
            prompt_of = [0] * len(settings)
        elif prompt_of is None:
            if len(prompts) != len(settings):
                raise ParleyError(f"{len(prompts)} prompts for {len(settings)} candidates: give prompt_of "
                                  "(the prompt of each candidate) or one candidate per prompt")
            prompt_of = list(range(len(prompts)))
        prompt_of = list(prompt_of)
        if len(prompt_of) != len(settings) or not all(isinstance(p, int) and 0 <= p < len(prompts)
                                                      for p in prompt_of):
            raise ParleyError(f"prompt_of must name one prompt (0 to {len(prompts) - 1}) for each of the "
                              f"{len(settings)} candidates; it is {prompt_of!r}")
        for i, p in enumerate(prompts):
            where = f"prompt {i}" if several else "the prompt"
            if not p:
                raise ParleyError(f"{where} is empty: give at least one token of context")
            if lm.max_context - len(p) < 1:
                raise ParleyError(f"{where} has {len(p)} tokens and the model's context holds "
                                  f"{lm.max_context}: shorten the conversation")
        self.lm, self.top_n = lm, top_alternatives
        self.prompts, self.prompt_of = prompts, prompt_of
        if static is None:   # PARLEY_CUDA_GRAPHS=0 turns the captured step off, to compare or to rule it out
            static = (lm.device.type == "cuda" and os.environ.get("PARLEY_CUDA_GRAPHS", "1") != "0"
                      or getattr(lm, "compiled_step", None) is not None)
        self.static = static
        # A candidate without a seed gets a random one, recorded in its settings so it can be replayed.
        # Each candidate's room is its own prompt's, not the padded width's.
        self.settings = [replace(s.validate(), seed=s.seed if s.seed is not None else _random_seed(),
                                 max_new_tokens=min(s.max_new_tokens, lm.max_context - len(prompts[p])))
                         for s, p in zip(settings, prompt_of)]
        rows = sum(s.num_beams for s in self.settings)
        check_memory(lm, graphs.bucket(rows) if static and rows <= MAX_ROWS else rows,   # a static step's bucket
                     max(len(p) for p in prompts) + max(s.max_new_tokens for s in self.settings))
        self.eos_ids = lm.eos_token_ids
        self._cancel: set[int] = set()
        self._updates: dict[int, Settings] = {}
        self._scheduled: dict[int, dict[int, Settings]] = {}   # step -> {candidate: settings} (replays)
        # the step each candidate's settings took effect at: what replaying it needs
        self.segments: list[list[tuple[int, Settings]]] = [[(0, s)] for s in self.settings]

    # -- control, between steps ------------------------------------------------------------------
    def cancel(self, candidate: int | None = None) -> None:
        """Stop one candidate (or all); it finishes with reason "cancelled" before the next step."""
        self._cancel.update(range(len(self.settings)) if candidate is None else [candidate])

    def update(self, candidate: int, settings: Settings, step: int | None = None) -> None:
        """Change a candidate's settings; they apply from its next token, or from `step` on (a
        replay's recorded segments: beams yield no event per step to change them after)."""
        old = self.settings[candidate]
        settings = settings.validate()
        if (settings.num_beams, settings.num_return_sequences) != (old.num_beams, old.num_return_sequences):
            raise ParleyError("num_beams and num_return_sequences cannot change while a candidate generates: "
                              "start a new generation")
        if settings.max_new_tokens > old.max_new_tokens:
            raise ParleyError(f"max_new_tokens can only be lowered while generating (it is {old.max_new_tokens})")
        settings = replace(settings, seed=settings.seed if settings.seed is not None else old.seed)
        if step is None:
            self._updates[candidate] = settings
        else:
            self._scheduled.setdefault(step, {})[candidate] = settings

    def run(self) -> list["Finished"]:
        """Generate to the end; return every candidate's result in candidate order."""
        done = [e for e in self if isinstance(e, Finished)]
        return sorted(done, key=lambda f: f.candidate)

    # -- the loop: prefill, then decoding steps (in the manner of gpt-fast's generate.py) -------------
    def __iter__(self):
        """Prefill, then a step per token of every live row, until every candidate has finished."""
        logits, prompts = self._prefill()
        batch = self._start_rows(prompts, logits)
        for step in itertools.count():
            batch, events = self._apply_controls(batch, step)
            yield from events
            if not len(batch.cand):
                return
            with torch.inference_mode():
                logprobs, scores, chosen = choose_tokens(batch, step, self.n_prompt, self.eos_ids)
            cand = batch.cand.tolist()
            order, chosen, ended, events = self._advance_beams(batch, cand, scores, chosen, step)
            if self.beams:   # each beam row now continues its parent beam's sequence
                batch, logprobs, scores = batch.take(order), logprobs[order], scores[order]
            batch.append(chosen, self.n_prompt + step)
            tokens, stopped = self._token_events(cand, chosen, logprobs, scores, step)
            yield from events + tokens
            ended |= stopped
            live = [c >= 0 and i not in ended for i, c in enumerate(cand)]
            batch, order, chosen = self._prune(batch, live, order, chosen)
            if not len(batch.cand):
                return
            batch.logits = self._decode(batch, chosen, order)

    def _prefill(self):
        """Every prompt through the model at once into a new cache (`self.cache`), left-padded to one
        width; returns their next-token logits [prompts, vocab] and the padded prompts, -1 at padding
        (what no-repeat n-grams read: -1 never matches a token)."""
        self.n_prompt = max(len(p) for p in self.prompts)
        padded = torch.tensor([[-1] * (self.n_prompt - len(p)) + p for p in self.prompts], device=self.lm.device)
        pad_mask = padded >= 0 if len({len(p) for p in self.prompts}) > 1 else None  # none: the fast path
        self.width = self.n_prompt + max(s.max_new_tokens for s in self.settings)
        self._started = time.perf_counter()
        self.cache, logits = prefill(self.lm.model, padded.clamp(min=0), pad_mask, self.width)
        self.prefill_s = time.perf_counter() - self._started
        self.rows_in_cache = len(self.prompts)
        self.step = None   # decode_step, or (a KV cache's models, `static`) a fixed-shape step
        if self.static and isinstance(self.cache, KVCache):
            step = getattr(self.lm, "compiled_step", None) or decode_step   # engine.load(..., compile=True)
            self.step = graphs.StaticStep(self.lm.model, step, capture=self.lm.device.type == "cuda", eager=decode_step)
        return logits, padded

    def _start_rows(self, prompts: torch.Tensor, logits: torch.Tensor) -> "_Batch":
        """One row per sampled candidate and num_beams rows per beam candidate, each repeating its
        prompt's prefilled cache row; a beam search or a text stream per candidate."""
        device = self.lm.device
        cand = torch.tensor([c for c, s in enumerate(self.settings) for _ in range(s.num_beams)], device=device)
        source = torch.tensor(self.prompt_of, device=device)[cand]
        with torch.inference_mode():
            self._select_rows(source)
        tok = self.lm.tokenizer
        self.beams = {c: BeamSearch(s, self.eos_ids, tok) for c, s in enumerate(self.settings) if s.num_beams > 1}
        self.streams = {c: _Stream(tok.stream_decoder(), StopMatcher(s.stop)) for c, s in enumerate(self.settings)
                        if s.num_beams == 1}
        return _Batch.start(cand, prompts[source], logits[source], self.width, self.settings, tok)

    def _apply_controls(self, batch: "_Batch", step: int) -> tuple["_Batch", list]:
        """What the caller asked for since the last step: cancelled candidates finish and leave the
        batch, changed settings apply from this step's token (and start a segment at `step`)."""
        events = []
        cancelled = self._cancel & set(batch.cand.tolist())
        if cancelled:
            events = [self._finish_cancelled(c) for c in sorted(cancelled)]
            keep = torch.tensor([c >= 0 and c not in cancelled for c in batch.cand.tolist()], device=self.lm.device)
            rows = keep.nonzero()[:, 0]
            batch = batch.take(rows)
            with torch.inference_mode():
                self._select_rows(rows)
            if not len(batch.cand):
                return batch, events
        scheduled = self._scheduled.pop(step, {})
        if not (self._updates or scheduled):
            return batch, events
        changed = {}
        for c, current in enumerate(self.settings):
            # one pop at a time: the UI thread may call update() meanwhile (what it adds waits a step)
            new = self._updates.pop(c, None) or scheduled.get(c)
            if new is not None and new != current:
                changed[c] = new
        if changed:
            for c, s in changed.items():
                self._start_segment(c, step, s)
            self.settings = [changed.get(c, s) for c, s in enumerate(self.settings)]
            batch = batch.take(torch.arange(len(batch.cand), device=self.lm.device), self.settings)
        return batch, events

    def _start_segment(self, c: int, step: int, settings: Settings) -> None:
        segments = self.segments[c]
        if segments[-1][0] == step:   # changed again before any token was drawn with the last ones
            segments.pop()
        segments.append((step, settings))

    def _advance_beams(self, batch: "_Batch", cand: list[int], scores, chosen, step: int):
        """One step of every beam search. Returns where each row's cache comes from (`order`: beams
        follow their parents), the tokens with the beams' own, the rows of searches that ended and
        their Finished events."""
        order = torch.arange(len(cand), device=self.lm.device)
        ended, events = set(), []
        if not self.beams:
            return order, chosen, ended, events
        chosen = chosen.clone()   # made in inference mode, so not writable outside it
        for c, search in self.beams.items():
            rows = [i for i, rc in enumerate(cand) if rc == c]
            if not rows:
                continue
            idx = torch.tensor(rows, dtype=torch.long, device=self.lm.device)
            parents, tokens = search.step(scores[idx], batch.sequences[idx, self.n_prompt:self.n_prompt + step])
            order[idx], chosen[idx] = idx[parents], tokens
            if search.done:
                ended.update(rows)
                events.append(self._finish_beam(c, search))
        return order, chosen, ended, events

    def _token_events(self, cand: list[int], chosen, logprobs, scores, step: int) -> tuple[list, set]:
        """A Token per sampled row, and a Finished for each whose candidate ends with it; returns
        the events and the rows that ended."""
        top = self._alternatives(logprobs, scores) if self.top_n else None
        picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        picked_sampled = scores.log_softmax(dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
        events, ended = [], set()
        for i, (c, token_id) in enumerate(zip(cand, chosen.tolist())):
            if c < 0 or c in self.beams:   # a finished row still in the batch (see _prune), or a beam
                continue
            stream = self.streams[c]
            text = stream.push(token_id)
            reason = ("eos" if token_id in self.eos_ids else "stop" if stream.matcher.stopped
                      else "length" if step + 1 >= self.settings[c].max_new_tokens else None)
            if reason in ("eos", "length"):
                text += stream.flush()
            stream.text.append(text)
            events.append(Token(c, step, token_id, text, picked[i], picked_sampled[i],
                                top[0][i] if top else [], top[1][i] if top else [],
                                self.lm.tokenizer.piece(token_id) if top else ""))
            if reason:
                ended.add(i)
                events.append(self._finish(c, reason, stream))
        return events, ended

    def _prune(self, batch: "_Batch", live: list[bool], order, chosen):
        """Drop the rows that are not `live` (and their entries of `order` and `chosen`)."""
        if all(live):
            return batch, order, chosen
        live = torch.tensor(live, device=self.lm.device)
        # Dropping rows copies the whole KV cache. Without beams, finished rows run on, ignored
        # (candidate -1), until a quarter of the batch has finished: cheaper than a copy per
        # step when many rows end one by one (RLHF rollouts). Rows never see each other. A static
        # step's rows run on until the live ones fit a smaller bucket (engine/graphs.py).
        n_live = int(live.sum())
        drop = (graphs.bucket(n_live) < self.cache.batch if self.step is not None
                else 4 * (len(live) - n_live) >= len(live))
        if self.beams or drop or not n_live:
            return batch.take(live.nonzero()[:, 0]), order[live], chosen[live]
        batch.cand = torch.where(live, batch.cand, -1)
        return batch, order, chosen

    def _decode(self, batch: "_Batch", chosen: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """The next-token logits after `chosen`, once the cache's rows follow `order` (beams, dropped rows)."""
        long_after = getattr(self.lm.model, "long_after", None)
        if long_after is not None and long_after == self.cache.length:
            # LongRoPE turns every position with other factors once the sequence passes the pretraining
            # length, so the cached keys are stale: the whole sequence goes through again, once, as
            # transformers' Phi-3 does at that token. (`batch.sequences` already follows `order`.)
            ids = batch.sequences[:, :self.cache.length + 1]
            self.cache, logits = prefill(self.lm.model, ids.clamp(min=0), ids >= 0, self.width)
            self.rows_in_cache = len(ids)
            if self.step is not None:   # its rows padded to their bucket again
                with torch.inference_mode():
                    self._select_rows(torch.arange(len(ids), device=ids.device))
            return logits
        with torch.inference_mode():
            if self.beams or len(order) != self.rows_in_cache:
                self._select_rows(order)
            if self.step is not None:
                return self.step(self.cache, chosen)
            cache = self.cache.decode_slot() if isinstance(self.cache, KVCache) else self.cache
            return decode_step(self.lm.model, chosen[:, None], cache)

    def _select_rows(self, rows: torch.Tensor) -> None:
        """The cache keeps (repeats, reorders) `rows` [n]; a static step's cache pads them to their
        bucket, in place when the bucket is the same, so that its tensors stay where a graph reads them."""
        self.rows_in_cache = len(rows)
        if self.step is None:
            self.cache.select_rows(rows)
            return
        rows = graphs.padded(rows)
        self.cache.select_rows(rows, in_place=len(rows) == self.cache.batch)

    def _finish_cancelled(self, c: int) -> "Finished":
        if c in self.beams:
            self.beams[c].cancel()
            return self._finish_beam(c, self.beams[c])
        self.streams[c].text.append(self.streams[c].flush())
        return self._finish(c, "cancelled", self.streams[c])

    def _finish(self, c: int, reason: str, stream: "_Stream") -> "Finished":
        elapsed = time.perf_counter() - self._started - self.prefill_s
        return Finished(c, reason, "".join(stream.text), list(stream.decoder.ids), self.settings[c],
                        _timings(self.prefill_s, elapsed, len(stream.decoder.ids)), prompt=self.prompt_of[c],
                        segments=list(self.segments[c]))

    def _alternatives(self, logprobs, scores):
        """The top tokens before and after each row's processors, as plain lists; after them, a
        token filtered out (probability 0) is no alternative."""
        before = logprobs.exp().topk(self.top_n, dim=-1)
        after = scores.softmax(dim=-1).topk(self.top_n, dim=-1)

        def as_lists(top, least):
            return [[Alternative(t, self.lm.tokenizer.piece(t), p) for t, p in zip(ids, probs) if p > least]
                    for ids, probs in zip(top.indices.tolist(), top.values.tolist())]
        return as_lists(before, -1.0), as_lists(after, 0.0)

    def _finish_beam(self, c: int, search: BeamSearch) -> "Finished":
        results = search.results()
        best = results[0]
        elapsed = time.perf_counter() - self._started - self.prefill_s
        return Finished(c, best["finish_reason"], best["text"], best["token_ids"], self.settings[c],
                        _timings(self.prefill_s, elapsed, search.steps), results, self.prompt_of[c],
                        list(self.segments[c]))


class _Stream:
    """A sampled candidate's text so far: UTF-8-safe pieces with stop strings held back and cut."""

    def __init__(self, decoder, matcher: StopMatcher):
        self.decoder, self.matcher, self.text = decoder, matcher, []

    def push(self, token_id: int) -> str:
        return self.matcher.push(self.decoder.push(token_id))

    def flush(self) -> str:
        return self.matcher.push(self.decoder.flush()) + self.matcher.flush()


@dataclass
class _Batch:
    """Per-row state of the live rows; `take` re-indexes all of it at once (beams, finished rows)."""
    cand: torch.Tensor        # [rows] candidate of each row
    seen: torch.Tensor        # [rows, vocab] tokens of the row's prompt (repetition penalty)
    counts: torch.Tensor      # [rows, vocab] output token counts (frequency and presence penalties)
    sequences: torch.Tensor   # [rows, width] left-padded prompt (-1 at padding) + output (no-repeat n-grams)
    seeds: torch.Tensor       # [rows]
    logits: torch.Tensor      # [rows, vocab] the next-token logits
    settings: list            # every candidate's settings
    rows: RowSettings = None
    mu: torch.Tensor = None   # [rows, 1] Mirostat's state, NaN until the row's first Mirostat token
    tokenizer: object = None  # for DRY's sequence breakers

    def __post_init__(self):
        if self.rows is None:
            # a finished row left in the batch (candidate -1) takes any settings: its tokens are ignored
            self.rows = RowSettings([self.settings[max(c, 0)] for c in self.cand.tolist()], self.cand.device,
                                    self.tokenizer)
            self.seeds = torch.tensor([s.seed for s in self.rows.settings], dtype=torch.long, device=self.cand.device)

    @classmethod
    def start(cls, cand, prompts, logits, width, settings, tokenizer=None):
        """`prompts` [rows, prompt width]: each row's left-padded prompt, -1 at padding."""
        n, vocab, device = len(cand), logits.shape[-1], cand.device
        seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, prompts.where(prompts >= 0, vocab), True)   # padding lands in the extra column
        sequences = torch.full((n, width), -1, dtype=torch.long, device=device)
        sequences[:, :prompts.shape[1]] = prompts
        return cls(cand, seen[:, :vocab], torch.zeros(n, vocab, dtype=torch.int32, device=device), sequences,
                   None, logits, settings, mu=torch.full((n, 1), torch.nan, device=device), tokenizer=tokenizer)

    def take(self, index: torch.Tensor, settings: list | None = None) -> "_Batch":
        return _Batch(self.cand[index], self.seen[index], self.counts[index], self.sequences[index], None,
                      self.logits[index], settings or self.settings, mu=self.mu[index], tokenizer=self.tokenizer)

    def append(self, chosen: torch.Tensor, position: int) -> None:
        self.sequences[:, position] = chosen
        self.counts[torch.arange(len(chosen), device=chosen.device), chosen] += 1


def prefill(model, ids: torch.Tensor, pad_mask: torch.Tensor | None, width: int):
    """Prompts [prompts, prompt width] through the model into a new cache of `width` slots (`pad_mask`:
    False at left padding); returns the cache and the next-token logits [prompts, vocab], float32."""
    # Inference mode, not just no_grad: no autograd bookkeeping at all, ~10% off a CPU step. Its
    # tensors cannot be written to outside it, so every write to the cache happens inside one.
    with torch.inference_mode():
        cache = model.new_cache(len(ids), width)
        return cache, model(ids, cache=cache, pad_mask=pad_mask, last_only=True)[:, -1].float()


def decode_step(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """One new token per row, ids [rows, 1], through the model: next-token logits [rows, vocab], float32.

    With a KV cache's DecodeSlot (KVCache.decode_slot) this is a pure function of tensors: it
    writes the slot's keys, values, validity and position counts in place and changes nothing
    else, has no Python branch on values and reads no number back, so
    torch.compile(decode_step, fullgraph=True) traces it whole (tests/test_generate.py)."""
    return model(ids, cache=cache)[:, -1].float()


def choose_tokens(batch: "_Batch", step: int, n_prompt: int, eos_ids: list[int]):
    """Every row's processors on its logits, then its token: greedy, drawn, or (beams) the best
    scores, which BeamSearch then ranks. Returns the model's log-probs, the processed scores and
    the tokens [rows]."""
    logprobs, scores, chosen, batch.mu = choose_row_tokens(batch.logits, batch.rows, batch.seen, batch.counts,
                                                           batch.sequences[:, :n_prompt + step], batch.seeds,
                                                           torch.full_like(batch.seeds, step), eos_ids, batch.mu)
    return logprobs, scores, chosen


def choose_row_tokens(logits, rows: RowSettings, seen, counts, sequences, seeds, steps, eos_ids: list[int],
                      mu: torch.Tensor):
    """choose_tokens on plain tensors, each row at its own step `steps` [rows] (its tokens so far):
    what a continuous batch (engine/serve/batcher.py), whose rows started at different times, needs.
    `mu` [rows, 1] is Mirostat's per-row state, NaN until the row's first Mirostat token; returns
    (log-probs, scores, tokens, mu after this step)."""
    start = torch.where(mu.isnan(), 2 * rows.mirostat_tau, mu) if rows.mirostat else None
    logprobs = logits.log_softmax(dim=-1)
    # Beams rank by log-probability, so their processors see log-probs, as in transformers.
    scores = sampling.process(torch.where(rows.beam, logprobs, logits), rows, seen, counts, sequences, steps, eos_ids,
                              mu=start)
    chosen = scores.argmax(dim=-1)
    if bool(rows.sample.any()):
        chosen = torch.where(rows.sample[:, 0], sampling.sample(scores, seeds, steps), chosen)
    if rows.mirostat:   # Mirostat's mu follows the surprise of each row's drawn token
        drawn = scores.log_softmax(dim=-1).gather(1, chosen[:, None])
        mu = torch.where(rows.on["mirostat"], sampling.mirostat_update(start, rows, drawn), mu)
    return logprobs, scores, chosen, mu


def _timings(prefill_s: float, decode_s: float, n_tokens: int) -> dict:
    return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens": n_tokens,
            "decode_tokens_per_s": n_tokens / decode_s if decode_s > 0 else 0.0}


# Rows (candidates x beams) one generation may hold. They decode side by side in one batch, so a
# person compares or ranks them; thousands are a typo (`--n 100000`), refused before any allocation.
MAX_ROWS = 1024


def check_memory(lm, rows: int, width: int) -> None:
    """Refuse a batch of `rows` rows of `width` tokens that cannot fit: before, not during, allocation."""
    if rows > MAX_ROWS:
        raise ParleyError(f"{rows} rows (candidates x beams) is more than one run holds ({MAX_ROWS}): "
                          "use fewer candidates or beams")
    with torch.inference_mode():
        cache = lm.model.new_cache(1, width)
    per_row = sum(t.numel() * t.element_size() for t in vars(cache).values() if isinstance(t, torch.Tensor))
    # besides its cache, a row has ~8 vocabulary-sized buffers (logits, counts, seen, processors' scores)
    per_row += 8 * 4 * lm.tokenizer.vocab_size + 8 * width
    need, free = rows * per_row, available_memory(lm.device)
    if free is not None and need > free:
        raise ParleyError(f"{rows} rows (candidates x beams) of {width} tokens need about {need / 2**30:.1f} GiB and "
                          f"{lm.device} has {free / 2**30:.1f} GiB free: use fewer candidates or beams, or lower "
                          "max_new_tokens")


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (the CPU: MemAvailable of Linux's /proc/meminfo), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
    return None


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


def generate(lm, prompt_ids: list[int] | list[list[int]], settings: list[Settings] | Settings,
             **kwargs) -> list[Finished]:
    """Generate every candidate to the end (no streaming); results in candidate order."""
    if isinstance(settings, Settings):
        settings = [settings]
    kwargs.setdefault("top_alternatives", 0)   # only Token events carry them
    return Generation(lm, prompt_ids, settings, **kwargs).run()


def generate_batch(lm, prompts: list[list[int]], settings: list[list[Settings]], max_rows: int = 64,
                   **kwargs) -> list[list[Finished]]:
    """Candidates `settings[i]` for each prompt i, results in the same nested shape (`prompt` i,
    `candidate` j within it): rollouts for RLHF. Whole prompts run together, as few Generations as
    keep each within `max_rows` cache rows (a prompt with more rows than that runs alone)."""
    if len(prompts) != len(settings):
        raise ParleyError(f"{len(prompts)} prompts and {len(settings)} lists of settings: give one list per prompt")
    chunks, rows = [[]], 0
    for i, candidates in enumerate(settings):
        need = sum(s.num_beams for s in candidates)
        if not need:
            continue
        if chunks[-1] and rows + need > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(i)
        rows += need
    results: list[list[Finished]] = [[] for _ in prompts]
    for chunk in filter(None, chunks):
        flat = [(k, i, j) for k, i in enumerate(chunk) for j in range(len(settings[i]))]
        done = generate(lm, [prompts[i] for i in chunk], [settings[i][j] for _, i, j in flat],
                        prompt_of=[k for k, _, _ in flat], **kwargs)
        for (_, i, j), f in zip(flat, done):
            results[i].append(replace(f, prompt=i, candidate=j))
    return results
