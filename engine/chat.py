"""The engine's narrow API for the app: chat replies that stream, persist and can be controlled.

The app never touches torch: it loads a model with `open_model`, asks `Replies` for one or
more candidates to a point of a conversation, iterates its events in a worker thread, and may
`cancel` or `update` candidates from the UI thread between tokens. Each candidate is an assistant
message in the store from its first token on (marked partial, saved as it grows), so a reply is
kept even if the app dies mid-stream.
"""
import time
from dataclasses import dataclass, field

from engine.errors import ParleyError
from engine.generate import Finished, Generation, Token
from engine.settings import Settings

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


def open_model(name_or_path: str | None, device: str | None = None, dtype: str | None = None):
    """(lm, ModelInfo) for a model directory or known name; slow, so the app calls it in a worker."""
    import engine
    from engine.registry import resolve_model
    path = resolve_model(name_or_path)
    lm = engine.load(path, device=device, dtype=dtype)
    info = ModelInfo(name_or_path or "default", str(path), lm.config.get("model_type", "?"), lm.num_parameters(),
                     str(lm.device), str(lm.dtype).removeprefix("torch."), lm.max_context)
    return lm, info


def prompt_ids(lm, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
    """Token ids of `messages` in the chat template, and how many of the oldest turns were dropped
    to leave room for the reply in the model's context (the system prompt is always kept)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
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
    candidates of each model run as one batch, and the batches stream together."""
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

    def __post_init__(self):
        messages = self.store.prompt_messages(self.conversation_id, self.parent_id)
        if not messages or messages[-1]["role"] == "assistant":
            raise ParleyError("a reply needs a user message to answer: write one first")
        chosen = [m or (self.lm, self.model_name) for m in (self.models or [None] * len(self.settings))]
        # one Generation per model, each with its candidates' global numbers
        self.groups: list[tuple[Generation, list[int]]] = []
        self.prompt_tokens: dict[int, int] = {}
        for lm in {id(lm): lm for lm, _ in chosen}.values():
            members = [i for i, (m, _) in enumerate(chosen) if m is lm]
            settings = [self.settings[i] for i in members]
            ids, dropped = prompt_ids(lm, messages, max(s.max_new_tokens for s in settings))
            self.dropped_turns = max(self.dropped_turns, dropped)
            generation = Generation(lm, ids, settings)
            for i, s in zip(members, generation.settings):   # with the seeds drawn for unseeded candidates
                self.settings[i] = s
                self.prompt_tokens[i] = len(ids)
            self.groups.append((generation, members))
        for s, (_, name) in zip(self.settings, chosen):
            self.message_ids.append(self.store.start_reply(self.conversation_id, self.parent_id, name,
                                                           s.to_dict(), make_current=False))
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
        parts = [[] for _ in self.settings]   # text pieces, joined only to save: linear in the reply's length
        saved = [time.monotonic()] * len(self.settings)
        for c, event in self.events():
            mid = self.message_ids[c]
            if isinstance(event, Token):
                parts[c].append(event.text)
                if time.monotonic() - saved[c] > SAVE_EVERY_S:
                    self.store.save_partial(mid, "".join(parts[c]))
                    saved[c] = time.monotonic()
                yield ReplyEvent(c, mid, token=event)
            else:
                self.store.finish_reply(mid, event.text, event.finish_reason, prompt_tokens=self.prompt_tokens[c],
                                        completion_tokens=len(event.token_ids), timings=event.timings,
                                        settings=event.settings.to_dict())
                yield ReplyEvent(c, mid, finished=event)
