"""Training and evaluation data: the built-in chitchat corpus, the user's text and JSONL files.

A conversation is a list of {"role", "content"} messages. The chitchat corpus (the
chitchat-dataset package, MIT licence: 7,168 conversations between two people) becomes
alternating user/assistant turns: the first speaker is the user, the second the assistant, and
consecutive utterances of one speaker join into one turn.

The held-out split is fixed: a conversation is held out when the first 8 hex digits of the SHA-1
of its id, as an integer, are divisible by 20 (about 5%). Plain-text files are split the same
way by line number.
"""
import hashlib
import json
from pathlib import Path

from engine.errors import ParleyError

ROLES = ("system", "user", "assistant")


def held_out(key: str) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 20 == 0


def split_by_prompt(items: list, prompt_of=lambda g: g["prompt"]) -> tuple[list, list]:
    """(train, held-out) by the fixed split of data.held_out on each item's prompt (a group's, by
    default); neither is empty. The app reads it too (which conversations a run trained on), so it
    lives here, away from torch."""
    def key(item):
        return json.dumps(prompt_of(item), sort_keys=True)
    train = [x for x in items if not held_out(key(x))]
    heldout = [x for x in items if held_out(key(x))]
    return train or items, heldout or train or items


def chitchat() -> list[tuple[str, list[dict]]]:
    """(id, messages) for every chitchat conversation, in the package's order."""
    try:
        import chitchat_dataset
    except ImportError:
        raise ParleyError("the chitchat corpus needs the chitchat-dataset package: "
                          "pip install chitchat-dataset") from None
    conversations = []
    for cid, conv in chitchat_dataset.Dataset().items():
        messages = []
        for i, turn in enumerate(conv["messages"]):
            text = " ".join(u["text"].strip() for u in turn if u["text"].strip())
            if text:
                messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        if len(messages) >= 2:
            conversations.append((cid, messages))
    return conversations


def read_conversations(path: str | Path) -> list[tuple[str, list[dict]]]:
    """(id, messages) from a JSONL file of {"messages": [...]}; every bad line is reported as FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise ParleyError(f"{path} does not exist: give a .jsonl file of {{\"messages\": [...]}} lines or a .txt file")
    conversations = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ParleyError(f"{where}: not valid UTF-8: save the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise ParleyError(f"{where}: invalid JSON ({e.msg}): each line must be one JSON object") from None
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ParleyError(f"{where}: needs \"messages\", a non-empty list of {{\"role\", \"content\"}}")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise ParleyError(f"{where}: messages[{i}] needs a role (system, user or assistant) and text "
                                      "content")
            conversations.append((f"{path.name}:{number}", messages))
    return conversations


def read_text(path: str | Path) -> list[tuple[str, str]]:
    """(key, line) for the non-empty lines of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise ParleyError(f"{path} does not exist: give a .txt or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ParleyError(f"{path}: not valid UTF-8 (byte {e.start}): save the file as UTF-8") from None
    return [(f"{path.name}:{i}", line) for i, line in enumerate(lines, 1) if line.strip()]


def load(source: str | None) -> tuple[list, list]:
    """(train, held-out) examples: conversations (lists of messages) or text lines (strings).

    `source` is None or "chitchat" for the built-in corpus, else a .jsonl or text file.
    """
    if source in (None, "chitchat"):
        items = chitchat()
    elif str(source).endswith(".jsonl"):
        items = read_conversations(source)
    else:
        items = read_text(source)
    train = [x for key, x in items if not held_out(key)]
    heldout = [x for key, x in items if held_out(key)]
    if not train:
        raise ParleyError(f"{source}: no training examples: the file is empty or too small")
    return train, heldout


def encode(tokenizer, example, assistant_only: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of an example and, per token, whether the loss counts it.

    A conversation is rendered with the tokenizer's chat template. With `assistant_only`, only
    the tokens inside assistant messages count (their content and the template's end-of-turn
    marker): the model learns to answer, not to imitate the user.
    """
    if isinstance(example, str):
        bos = tokenizer.token_id(tokenizer.special_tokens.get("bos_token"))
        ids = ([bos] if bos is not None else []) + tokenizer.encode(example, add_special_tokens=False)
        eos = tokenizer.eos_token_id
        ids = ids + ([eos] if eos is not None else [])
        return ids, [1] * len(ids)
    text = tokenizer.render_chat(example, add_generation_prompt=False)
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    if not assistant_only:
        return encoding.ids, [1] * len(encoding.ids)
    spans = assistant_spans(tokenizer, example, text)
    mask = [int(any(start <= a and b <= end for start, end in spans)) for a, b in encoding.offsets]
    return encoding.ids, mask


def assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant message in the rendered text: from the end of the
    template's assistant header to the end of the turn (the next message's start, or the end)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.render_chat(messages[:i + 1], add_generation_prompt=False)
        if not text.startswith(before) or not text.startswith(through):
            raise ParleyError("the chat template does not render conversations incrementally, so assistant tokens "
                              "cannot be found: use a ChatML-style template for SFT")
        spans.append((len(before), len(through)))
    return spans
