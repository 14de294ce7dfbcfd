"""The engine's narrow API for the app: chat replies that stream, persist and can be controlled.

The app never touches torch: it loads a model with `open_model`, asks `Replies` for one or
more candidates to a point of a conversation, iterates its events in a worker thread, and may
`cancel` or `update` candidates from the UI thread between tokens. Each candidate is an assistant
message in the store from its first token on (marked partial, saved as it grows), so a reply is
kept even if the app dies mid-stream. At its end the reply keeps every token with its
alternatives, and the settings it started with and each change made while it streamed
(segments), so that `replay` regenerates it exactly and `continue_from` starts a sibling reply
from any alternative token.
"""
import math
import time
from dataclasses import dataclass, field, replace

from engine import bert_fill
from engine.errors import ParleyError
from engine.generate import Finished, Generation, Token
from engine.settings import Settings, segments, settings_at

SAVE_EVERY_S = 0.5


@dataclass
class ModelInfo:
    name: str
    path: str
    model_type: str
    parameters: int
    device: str
    dtype: str
    max_context: int


def open_model(name_or_path: str | None, device: str | None = None, dtype: str | None = None,
               quantize: str | None = None):
    """(lm, ModelInfo) for a model directory or known name, loaded to decode (engine/quantize.py:
    the app never trains or saves the model it chats with); slow, so the app calls it in a worker."""
    import engine
    from engine.registry import resolve_model
    path = resolve_model(name_or_path)
    if bert_fill.is_bert_dir(path):   # no left-to-right model: it fills masks (engine/bert_fill.py)
        if quantize:
            raise ParleyError(f"{path} is a BERT, which int8 weights do not cover: run it without --quantize")
        lm = bert_fill.load(path, device)
    else:
        lm = engine.load(path, device=device, dtype=dtype, decode_only=True, quantize=quantize)
    dtype = str(lm.dtype).removeprefix("torch.") + (f", {quantize} weights" if quantize else "")
    info = ModelInfo(name_or_path or "default", str(path), lm.config.get("model_type", "?"), lm.num_parameters(),
                     str(lm.device), dtype, lm.max_context)
    return lm, info


def open_reward_model(name_or_path: str, device: str | None = None):
    """(reward model, the directory it was read from) for a reward model's directory or known name;
    slow, so the app calls it in a worker."""
    from engine.registry import resolve_model
    from engine.rlhf.reward_model import load_reward_model
    path = resolve_model(name_or_path)
    return load_reward_model(path, device), str(path)


def score_replies(rm, store, reward_model: str, message_ids: list[str]) -> dict[str, float | None]:
    """Each reply's reward (None: too long for the reward model), recorded in the store under
    `reward_model` (the directory's path), all rows in one batched run."""
    from engine.rlhf.reward_model import score_messages
    scores = score_messages(rm, store, [store.message(m) for m in message_ids])
    store.save_scores(reward_model, {m: s for m, s in scores.items() if s is not None})
    return scores


def prompt_ids(lm, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
    """Token ids of `messages` in the chat template, and how many of the oldest turns were dropped
    to leave room for the reply in the model's context (the system prompt is always kept)."""
    system, turns = _split_system(messages)
    dropped = 0
    while True:
        ids = lm.tokenizer.encode_chat(system + turns[dropped:])
        if len(ids) + max_new_tokens <= lm.max_context or dropped >= len(turns) - 1:
            break
        dropped += 1
    if len(ids) >= lm.max_context:
        raise ParleyError(f"the last message alone is {len(ids)} tokens and the model's context holds "
                          f"{lm.max_context}: shorten it")
    return ids, dropped


def _split_system(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    system = [m for m in messages[:1] if m["role"] == "system"]
    return system, messages[len(system):]


@dataclass
class ReplyEvent:
    candidate: int
    message_id: str
    token: Token | None = None        # a new token (text, alternatives)
    finished: Finished | None = None  # the candidate is done: its whole text, finish reason, timings


@dataclass
class Replies:
    """Generate candidates for the reply after `parent_id`; see the module docstring.

    `models` gives a candidate a model of its own, as (lm, name), where None keeps `lm`: the
    candidates of each model run as one batch, and the batches stream together. A BERT's
    candidates are filled in rather than generated (engine/bert_fill.py): `notes` holds the line
    saying so for each of them.

    `forced` (token ids): every candidate starts with these tokens, taken, not generated (a
    continuation: see `continue_from`); the model generates on from the prompt and them. The
    reply's content starts with their text, its token data with `forced_tokens` (their stored
    records, as `Store.reply_tokens` gives them; without, records without probabilities), and its
    tokens' `step` counts from the reply's first token, forced ones included."""
    lm: object
    store: object
    conversation_id: str
    parent_id: str | None
    settings: list[Settings]
    model_name: str | None = None
    models: list | None = None
    dropped_turns: int = 0
    message_ids: list[str] = field(default_factory=list)
    comparison_id: str | None = None
    forced: list[int] | None = None
    forced_tokens: list[dict] | None = None
    notes: dict[int, str] = field(default_factory=dict)

    def __post_init__(self):
        messages = self.store.prompt_messages(self.conversation_id, self.parent_id)
        if not messages or messages[-1]["role"] == "assistant":
            raise ParleyError("a reply needs a user message to answer: write one first")
        self.forced = _checked_forced(self.lm, self.forced)
        self.forced_tokens, self.forced_text = _forced_records(self.lm.tokenizer, self.forced, self.forced_tokens)
        chosen = [m or (self.lm, self.model_name) for m in (self.models or [None] * len(self.settings))]
        # one Generation per model, each with its candidates' global numbers
        self.groups: list[tuple[Generation, list[int]]] = []
        self.prompt_tokens: dict[int, int] = {}
        for lm in {id(lm): lm for lm, _ in chosen}.values():
            members = [i for i, (m, _) in enumerate(chosen) if m is lm]
            settings = [self.settings[i] for i in members]
            if getattr(lm, "fills_masks", False):
                if self.forced:
                    raise ParleyError("a BERT fills its reply's positions in any order: it cannot continue "
                                      "from a chosen token; compare it from the user's message instead")
                generation = bert_fill.MaskFilling(lm, lm.prompt_ids(messages), settings)
                ids = generation.prompt
                self.notes.update({i: bert_fill.note(s) for i, s in zip(members, generation.settings)})
            else:
                ids, dropped = prompt_ids(lm, messages, len(self.forced) + max(s.max_new_tokens for s in settings))
                self.dropped_turns = max(self.dropped_turns, dropped)
                generation = Generation(lm, ids + self.forced, settings)
            for i, s in zip(members, generation.settings):   # with the seeds drawn for unseeded candidates
                self.settings[i] = s
                self.prompt_tokens[i] = len(ids)
            self.groups.append((generation, members))
        for s, (_, name) in zip(self.settings, chosen):
            self.message_ids.append(self.store.start_reply(self.conversation_id, self.parent_id, name,
                                                           s.to_dict(), make_current=False,
                                                           content=self.forced_text))
        if len(self.message_ids) > 1:
            self.comparison_id = self.store.create_comparison(self.conversation_id, self.parent_id,
                                                              self.message_ids)
        self.store.set_current_leaf(self.conversation_id, self.message_ids[0])

    def _find(self, candidate: int) -> tuple[Generation, int]:
        for generation, members in self.groups:
            if candidate in members:
                return generation, members.index(candidate)
        raise ParleyError(f"there is no candidate {candidate}")

    def cancel(self, candidate: int | None = None) -> None:
        if candidate is None:
            for generation, _ in self.groups:
                generation.cancel()
        else:
            generation, local = self._find(candidate)
            generation.cancel(local)

    def update(self, candidate: int, settings: Settings) -> None:
        generation, local = self._find(candidate)
        generation.update(local, settings)

    def events(self):
        """(candidate, event) from every model's generation, taken in turn."""
        running = [(iter(generation), members) for generation, members in self.groups]
        while running:
            for item in list(running):
                stream, members = item
                event = next(stream, None)
                if event is None:
                    running.remove(item)
                else:
                    yield members[event.candidate], event

    def __iter__(self):
        # text pieces, joined only to save: linear in the reply's length
        parts = [[self.forced_text] for _ in self.settings]
        tokens = [[] for _ in self.settings]
        saved = [time.monotonic()] * len(self.settings)
        for c, event in self.events():
            mid = self.message_ids[c]
            if isinstance(event, Token):
                if self.forced:
                    event = replace(event, step=event.step + len(self.forced))
                if event.snapshot is not None:   # filled out of order: the whole reply so far
                    parts[c] = [self.forced_text, event.snapshot]
                else:
                    parts[c].append(event.text)
                tokens[c].append(event)
                if time.monotonic() - saved[c] > SAVE_EVERY_S:
                    self.store.save_partial(mid, "".join(parts[c]))
                    saved[c] = time.monotonic()
                yield ReplyEvent(c, mid, token=event)
            else:
                self._finish(c, event, tokens[c])
                yield ReplyEvent(c, mid, finished=event)

    def _finish(self, c: int, event: Finished, tokens: list[Token]) -> None:
        """The reply's row, its settings and segments (their steps counted from the reply's first
        token) and its tokens, in one transaction: two writes whatever the reply's length."""
        forced = len(self.forced)
        held = [{"from": step + forced, "settings": s.to_dict()} for step, s in event.segments]
        # beams stream no tokens: their best sequence is kept, without probabilities
        generated = (_forced_records(self.lm.tokenizer, event.token_ids, None)[0] if event.beams
                     else [token_record(t) for t in sorted(tokens, key=lambda t: t.step)])   # mask filling: by place
        with self.store.transaction():
            self.store.finish_reply(self.message_ids[c], self.forced_text + event.text, event.finish_reason,
                                    prompt_tokens=self.prompt_tokens[c],
                                    completion_tokens=forced + len(event.token_ids), timings=event.timings,
                                    settings=held[0]["settings"], segments=held)
            self.store.save_reply_tokens(self.message_ids[c], self.forced_tokens + generated, forced=forced)


def token_record(token: Token) -> dict:
    """A streamed token as the store keeps it (`Store.save_reply_tokens`)."""
    def alternatives(top):
        return [{"token_id": a.token_id, "piece": a.text, "prob": a.prob} for a in top]
    return {"token_id": token.token_id, "piece": token.piece, "text": token.text, "logprob": token.logprob,
            "sampled_logprob": token.sampled_logprob, "before": alternatives(token.top_before),
            "after": alternatives(token.top_after)}


def _checked_forced(lm, forced: list[int] | None) -> list[int]:
    forced = list(forced or [])
    vocab = lm.config.get("vocab_size") or lm.tokenizer.vocab_size
    bad = next((t for t in forced if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise ParleyError(f"forced token {bad!r} is not a token id of this model (0 to {vocab - 1}): "
                          "give the ids of a stored reply's tokens")
    return forced


def _forced_records(tokenizer, ids: list[int], given: list[dict] | None) -> tuple[list[dict], str]:
    """Token records for tokens taken, not generated, and their text: `given` records keep their
    probabilities; piece and text come from the tokenizer, so that they match the ids."""
    if given is not None and [r.get("token_id") for r in given] != list(ids):
        raise ParleyError("forced_tokens must be the records of the forced tokens, one each, in order: "
                          "give the tokens of `continue_from`, or none")
    decoder = tokenizer.stream_decoder()
    texts = [decoder.push(t) for t in ids]
    if texts:
        texts[-1] += decoder.flush()
    kept = [{k: v for k, v in r.items() if k != "step"} for r in given] if given else [{} for _ in ids]
    records = [{"logprob": None, "sampled_logprob": None, "before": [], "after": [], **r,
                "token_id": t, "piece": tokenizer.decode([t], skip_special_tokens=False), "text": text}
               for r, t, text in zip(kept, ids, texts)]
    return records, "".join(texts)


@dataclass
class Continuation:
    """What a sibling reply that takes another token at `step` of a stored reply needs; unpacks as
    (parent_id, forced, settings). `tokens`: the records of the forced tokens, for Replies'
    `forced_tokens` (the kept ones as stored; the new one with the source's alternatives there)."""
    parent_id: str | None
    forced: list[int]
    settings: Settings
    tokens: list[dict]

    def __iter__(self):
        return iter((self.parent_id, self.forced, self.settings))


def continue_from(store, message_id: str, step: int, token_id: int) -> Continuation:
    """A new reply keeping the first `step` tokens of reply `message_id` and taking `token_id` in
    place of the one at `step`, with the settings (seed included) in force at that step:
    `Replies(lm, store, conversation, c.parent_id, [c.settings], forced=c.forced, forced_tokens=c.tokens)`."""
    message, stored = _stored_reply(store, message_id)
    tokens = stored["tokens"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < len(tokens):
        raise ParleyError(f"step {step!r} is not a token of reply {message_id!r}: it has tokens 0 to "
                          f"{len(tokens) - 1}" if tokens else f"reply {message_id!r} has no tokens to continue from")
    settings = Settings.from_dict(settings_at(message, step))
    return Continuation(message["parent_id"], [t["token_id"] for t in tokens[:step]] + [token_id], settings,
                        tokens[:step] + [_taken_instead(tokens[step], token_id)])


def _taken_instead(source: dict, token_id: int) -> dict:
    """The record of `token_id` put where `source` was drawn: the same distribution, so the same
    alternatives, and its own probabilities where they hold it."""
    if token_id == source["token_id"]:
        return dict(source)

    def logprob(side):
        prob = next((a["prob"] for a in source[side] if a["token_id"] == token_id), None)
        return math.log(prob) if prob else None
    return {**source, "token_id": token_id, "logprob": logprob("before"), "sampled_logprob": logprob("after")}


def replay(lm, store, message_id: str) -> Finished:
    """Generate a stored reply again: its prompt, forced tokens, settings and seed, each segment's
    settings from the step they took effect at, and a cancelled one cut where it was."""
    message, stored = _stored_reply(store, message_id)
    forced = [t["token_id"] for t in stored["tokens"][:stored["forced"]]]
    prompt = _stored_prompt(lm, store.prompt_messages(message["conversation_id"], message["parent_id"]),
                            message["prompt_tokens"], message_id)
    # segments count from the reply's first token; the generation's steps from its first generated one
    (_, first), *later = [(s["from"] - len(forced), Settings.from_dict(s["settings"])) for s in segments(message)]
    generation = Generation(lm, prompt + forced, [first], top_alternatives=0)
    for step, settings in later:
        generation.update(0, settings, step=step)
    cut = len(stored["tokens"]) - len(forced) if message["finish_reason"] == "cancelled" else None
    if cut == 0:
        generation.cancel(0)
    for event in generation:
        if isinstance(event, Finished):
            return event
        if event.step + 1 == cut:
            generation.cancel(0)


def _stored_reply(store, message_id: str) -> tuple[dict, dict]:
    message = store.message(message_id)
    stored = store.reply_tokens(message_id)
    if stored is None or message["role"] != "assistant" or not message["settings"]:
        raise ParleyError(f"message {message_id!r} has no stored tokens: only replies Parley generated "
                          "(since schema 4) can be replayed or continued")
    return message, stored


def _stored_prompt(lm, messages: list[dict], length: int | None, message_id: str) -> list[int]:
    """The prompt a reply was generated after: its conversation with as many of the oldest turns
    dropped as give its recorded prompt length."""
    system, turns = _split_system(messages)
    for dropped in range(max(len(turns), 1)):
        ids = lm.tokenizer.encode_chat(system + turns[dropped:])
        if length is None or len(ids) == length:
            return ids
        if len(ids) < length:
            break
    raise ParleyError(f"reply {message_id!r} was generated after a prompt of {length} tokens and its conversation "
                      "now gives another (a changed system prompt, or another model's chat template): replay it "
                      "with the model that wrote it")
