"""Continuous batching: requests join a running batch at the next step and leave it when done.

One `Batcher` per served model holds one KV cache for every live row (one row per choice of every
request). A newcomer is prefilled on its own, then its cache rows are joined with the running
ones: the shorter side is left-padded so every row's newest token sits in the same slot, as in a
Generation (engine/models/cache.py: positions come from each row's own count of real tokens, so
padding changes no row's positions). Each step then runs one forward pass for all rows; a row's
processors read its own settings, its own step count and its own Mirostat state (mu, carried
across steps as a Generation carries it), and sampling draws from (seed, step) noise, so a
request's tokens for a seed do not depend on what else runs (on the CPU the decoding products are
batch-invariant too; engine/models/linear.py).

Why not one Generation per request: a Generation's rows share one start, one prompt width and one
step counter; here rows start whenever a request arrives. The per-step work (`choose_row_tokens`,
`decode_step`, `prefill`) is the one generate.py has; what this module adds is joining and dropping
rows. Beam search is not served (its rows follow their parents, which joins would complicate);
`parley generate` has it.

Everything here runs in the engine thread (`Engine`); HTTP handlers hand in `Job`s and receive
events through each job's `emit`, a function that must be safe to call from that thread.
"""
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace

import torch

from engine.errors import ParleyError
from engine.generate import (Alternative, Finished, Token, _random_seed, _Stream, check_memory, choose_row_tokens,
                             decode_step, prefill)
from engine.models.cache import KVCache
from engine.sampling import RowSettings
from engine.settings import Settings
from engine.stop import StopMatcher


@dataclass
class Failed:
    """The job could not run (a ParleyError message, or an internal error): no more events follow."""
    message: str
    internal: bool = False


@dataclass
class Job:
    """One request: a prompt and a Settings per choice (seeds set), for one model.

    `emit(event)` receives a `Token` per new token of each choice (`candidate` = the choice),
    a `Finished` per choice, or one `Failed`; it is called from the engine thread."""
    prompt_ids: list[int]
    settings: list[Settings]
    emit: object
    top_logprobs: int = 0        # alternatives wanted with each token (0: none)
    cancelled: bool = False      # set by any thread (client gone); the rows go at the next step
    submitted: float = field(default_factory=time.perf_counter)


class _Row:
    """One choice of a job in the running batch."""

    def __init__(self, job: Job, choice: int, lm):
        self.job, self.choice, settings = job, choice, job.settings[choice]
        # as in a Generation: no seed means a random one, recorded in the settings the reply reports
        self.settings = settings if settings.seed is not None else replace(settings, seed=_random_seed())
        self.stream = _Stream(lm.tokenizer.stream_decoder(), StopMatcher(self.settings.stop))
        self.text: list[str] = []
        self.step = 0
        self.started = time.perf_counter()

    @property
    def left(self) -> int:
        """Tokens this row may still write."""
        return self.settings.max_new_tokens - self.step


class Batcher:
    """The running batch of one model; `step()` advances it by one token per row (engine thread only)."""

    def __init__(self, lm, max_rows: int = 64):
        if not isinstance(lm.model.new_cache(1, 1), KVCache):
            raise ParleyError(f"{lm.config.get('model_type')} models keep a recurrent or n-gram state that cannot "
                              "join a running batch: serve a Transformer model (GPT-2, Llama, Qwen, Mistral, "
                              "Phi-3, Gemma)")
        self.lm, self.max_rows = lm, max_rows
        self.pending: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._waiting: list[Job] = []      # taken from `pending`, not yet admitted (the batch was full)
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None

    def submit(self, job: Job) -> None:
        """Any thread: the job joins the batch at a coming step."""
        self.pending.put(job)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self._waiting or not self.pending.empty())

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit waiting jobs, drop cancelled ones, then choose a token for every row and run the
        forward pass that gives the next logits."""
        self._drop([i for i, r in enumerate(self.rows) if r.job.cancelled], "cancelled")
        self._admit()
        if not self.rows:
            return
        with torch.inference_mode():
            logprobs, _scores, chosen, self.mu = choose_row_tokens(
                self.logits, self.row_settings, self.seen, self.counts, self.sequences[:, :self.cache.length],
                self.seeds, self.steps, self.lm.eos_token_ids, self.mu)
            self.sequences[:, self.cache.length] = chosen
            self.counts[torch.arange(len(chosen), device=chosen.device), chosen] += 1
            self.steps += 1
        ended = self._emit_tokens(chosen, logprobs)
        self._drop(ended, None)
        if self.rows:
            with torch.inference_mode():
                live = chosen[[i for i in range(len(chosen)) if i not in set(ended)]] if ended else chosen
                self.logits = decode_step(self.lm.model, live[:, None], self.cache.decode_slot())

    def _emit_tokens(self, chosen, logprobs) -> list[int]:
        """A Token per row, and a Finished for each row that ends with it; returns the rows that ended."""
        eos_ids = self.lm.eos_token_ids
        wanted = max(r.job.top_logprobs for r in self.rows)
        picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        top = logprobs.topk(wanted, dim=-1) if wanted else None
        top_ids, top_lps = (top.indices.tolist(), top.values.tolist()) if top is not None else (None, None)
        ended = []
        for i, (row, token_id) in enumerate(zip(self.rows, chosen.tolist())):
            text = row.stream.push(token_id)
            reason = ("eos" if token_id in eos_ids else "stop" if row.stream.matcher.stopped
                      else "length" if row.step + 1 >= row.settings.max_new_tokens else None)
            if reason in ("eos", "length"):
                text += row.stream.flush()
            row.text.append(text)
            k = row.job.top_logprobs
            # Alternative.prob holds a log-probability here: what the OpenAI API reports
            alternatives = [Alternative(t, self.lm.tokenizer.piece(t), lp) for t, lp in zip(top_ids[i][:k], top_lps[i][:k])] \
                if k else []
            row.job.emit(Token(row.choice, row.step, token_id, text, picked[i], picked[i], alternatives,
                               piece=self.lm.tokenizer.piece(token_id)))
            row.step += 1
            if reason:
                ended.append(i)
                row.job.emit(self._finished(row, reason))
        return ended

    def _finished(self, row: _Row, reason: str) -> Finished:
        elapsed = time.perf_counter() - row.started
        return Finished(row.choice, reason, "".join(row.text), list(row.stream.decoder.ids), row.settings,
                        {"queued_s": row.started - row.job.submitted, "generate_s": elapsed,
                         "tokens": row.step, "tokens_per_s": row.step / elapsed if elapsed > 0 else 0.0})

    # -- rows in and out --------------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill each waiting job alone (so its prompt's bits are what they are alone), then join
        all their rows and the running ones in one new cache, while they fit in `max_rows` and memory."""
        while not self.pending.empty():
            self._waiting.append(self.pending.get())
        self._waiting = [j for j in self._waiting if not j.cancelled]
        joining: list[tuple[Job, KVCache, torch.Tensor]] = []
        rows = len(self.rows)
        while self._waiting:
            job = self._waiting[0]
            n = len(job.settings)
            if rows and rows + n > self.max_rows:
                break   # waits for rows to finish
            try:
                check_memory(self.lm, rows + n, self._width(job) + 1)
            except ParleyError as e:
                if rows:
                    break
                self._waiting.pop(0)
                job.emit(Failed(str(e)))
                continue
            self._waiting.pop(0)
            ids = torch.tensor([job.prompt_ids], device=self.lm.device)
            cache, logits = prefill(self.lm.model, ids, None, len(job.prompt_ids) + 1)
            with torch.inference_mode():
                cache.select_rows(torch.zeros(n, dtype=torch.long, device=self.lm.device))
            joining.append((job, cache, logits.expand(n, -1)))
            rows += n
        if joining:
            self._join(joining)

    def _width(self, job: Job) -> int:
        """The cache width the batch needs with `job` in it: the longest row so far plus the most tokens any row may add."""
        span = max([len(job.prompt_ids)] + [int(s) for s in (self.cache.seen.tolist() if self.rows else [])])
        return span + max([s.max_new_tokens for s in job.settings] + [r.left for r in self.rows])

    def _join(self, joining: list) -> None:
        """One cache, and per-row tensors, for the running rows followed by the joining jobs' rows."""
        device = self.lm.device
        parts = ([(self.cache, self.sequences, self.seen, self.counts, self.logits, self.mu)] if self.rows else [])
        new_rows = []
        for job, cache, logits in joining:
            n = len(job.settings)
            prompt = torch.tensor([job.prompt_ids], device=device).expand(n, -1)
            vocab = logits.shape[-1]
            seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
            seen[:, prompt[0]] = True
            parts.append((cache, prompt, seen, torch.zeros(n, vocab, dtype=torch.int32, device=device), logits,
                          torch.full((n, 1), torch.nan, device=device)))   # Mirostat's mu: not started
            new_rows += [_Row(job, c, self.lm) for c in range(n)]
        self.rows += new_rows
        extra = max(r.left for r in self.rows) + 1
        with torch.inference_mode():
            self.cache, self.sequences = join_caches(self.lm.model, [(p[0], p[1]) for p in parts], extra)
            self.seen = torch.cat([p[2] for p in parts])
            self.counts = torch.cat([p[3] for p in parts])
            self.logits = torch.cat([p[4] for p in parts])
            self.mu = torch.cat([p[5] for p in parts])
        self._rows_changed()
        self.steps = torch.tensor([r.step for r in self.rows], dtype=torch.long, device=device)

    def _drop(self, indices: list[int], reason: str | None) -> None:
        """Rows leave the batch (finished, or `reason` "cancelled": their job's client is gone)."""
        if not indices:
            return
        gone = set(indices)
        if reason:
            for i in indices:
                self.rows[i].text.append(self.rows[i].stream.flush())
                self.rows[i].job.emit(self._finished(self.rows[i], reason))
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.lm.device)
        with torch.inference_mode():
            self.cache.select_rows(index)
            self.sequences, self.seen, self.counts = self.sequences[index], self.seen[index], self.counts[index]
            self.steps, self.logits, self.mu = self.steps[index], self.logits[index], self.mu[index]
        self._rows_changed()

    def _rows_changed(self) -> None:
        settings = [r.settings for r in self.rows]
        self.row_settings = RowSettings(settings, self.lm.device, self.lm.tokenizer)   # the tokenizer: DRY's breakers
        self.seeds = torch.tensor([s.seed for s in settings], dtype=torch.long, device=self.lm.device)

    def fail_all(self, message: str) -> None:
        """After an internal error: every job in the batch or waiting gets `Failed`, the batch starts empty."""
        jobs = {id(r.job): r.job for r in self.rows}
        jobs.update({id(j): j for j in self._waiting})
        while not self.pending.empty():
            j = self.pending.get()
            jobs[id(j)] = j
        for job in jobs.values():
            job.emit(Failed(message, internal=True))
        self.rows, self._waiting, self.cache = [], [], None


def join_caches(model, parts: list[tuple[KVCache, torch.Tensor]], extra: int) -> tuple[KVCache, torch.Tensor]:
    """One KV cache with the rows of every cache in `parts`, in order, and room for `extra` more tokens.

    Each part is (cache, sequences [rows, >= cache.length]: its tokens per slot, -1 at padding). Every
    row keeps its real tokens in the last slots, so the new cache is as wide as the longest row
    (`seen`) and each part's last slots go to its right end: the shorter side is left-padded, and
    padding no row needs any more is dropped. Returns the cache and the joined sequences (-1 at padding)."""
    span = max(int(cache.seen.max()) for cache, _ in parts)
    total = sum(cache.batch for cache, _ in parts)
    out = model.new_cache(total, span + extra)
    device = out.valid.device
    sequences = torch.full((total, span + extra), -1, dtype=torch.long, device=device)
    r = 0
    for cache, seq in parts:
        b, n = cache.batch, min(span, cache.length)
        src = slice(cache.length - n, cache.length)
        dst = slice(span - n, span)
        out.k[:, r:r + b, :, dst] = cache.k[:, :, :, src]
        out.v[:, r:r + b, :, dst] = cache.v[:, :, :, src]
        out.valid[r:r + b, dst] = cache.valid[:, src]
        out.seen[r:r + b] = cache.seen
        sequences[r:r + b, dst] = seq[:, src]
        r += b
    out.length = out.start = span
    out.padded = bool((out.seen < span).any())
    return out, sequences


class Engine:
    """The one thread that runs every model's batch, a step of each in turn, while any has work."""

    def __init__(self, batchers: dict[str, Batcher]):
        self.batchers = batchers
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="parley-engine", daemon=True)
        self._thread.start()

    def submit(self, model: str, job: Job) -> None:
        self.batchers[model].submit(job)
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """Any thread: the job's rows leave the batch before the next step (its client went away)."""
        job.cancelled = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()   # before looking for work: a submit from now on wakes the next wait
            while not self._stopping and any(b.busy for b in self.batchers.values()):
                for batcher in self.batchers.values():
                    try:
                        batcher.step()
                    except Exception:   # a bug must not kill the server: its batch fails, the rest goes on
                        traceback.print_exc(file=sys.stderr)
                        batcher.fail_all("internal error in the engine (see the server's log)")
