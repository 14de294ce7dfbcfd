"""Import and export of the store's data as JSON Lines, to take it elsewhere and back.

Formats (one JSON object per line):
  conversations/jsonl  a conversation with every message of its tree (ids kept)
  conversations/trl    {"messages": [...]}: the current thread, system prompt first (SFT data)
  prefs/jsonl          {"prompt": [messages], "chosen": text, "rejected": text, models, annotator, time}
  prefs/trl            TRL's conversational preference format: chosen/rejected as assistant messages
  rankings/jsonl       a ranking with its prompt and every candidate's text, settings, rank and flags

An import reads and checks every line first; one bad line refuses the whole file with
`FILE:LINE: what is wrong`, and nothing is written. Export, import, export gives the same file.
"""
import json
from pathlib import Path

from engine.errors import ParleyError
from engine.files import atomic_write_text
from engine.store.store import ROLES, Store, now

MAX_LINE = 16 * 2**20
FORMATS = {"conversations": ("jsonl", "trl"), "prefs": ("jsonl", "trl"), "rankings": ("jsonl",)}


# -- export ------------------------------------------------------------------------------------------
def export(store: Store, kind: str, fmt: str, out: str) -> int:
    """Write `kind` in format `fmt` to the file `out` ("-" for standard output); return the line count."""
    if fmt not in FORMATS.get(kind, ()):
        raise ParleyError(f"cannot export {kind} as {fmt!r}: use {' or '.join(FORMATS.get(kind, ('jsonl',)))}")
    rows = {"conversations": _conversation_rows, "prefs": _pref_rows, "rankings": _ranking_rows}[kind](store, fmt)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if out == "-":
        print(text, end="")
    else:
        atomic_write_text(out, text)
    return text.count("\n")


MESSAGE_FIELDS = ("id", "parent_id", "role", "content", "model", "settings", "prompt_tokens", "completion_tokens",
                  "timings", "finish_reason", "status", "created_at")


def _conversation_rows(store: Store, fmt: str):
    conversations = store.db.query("SELECT * FROM conversations ORDER BY created_at, rowid")
    for c in conversations:
        if fmt == "trl":  # training data: the current thread; a conversation with no message has none
            thread = [{"role": m["role"], "content": m["content"]} for m in store.thread(c["id"])]
            system = [{"role": "system", "content": c["system_prompt"]}] if c["system_prompt"] else []
            if thread:
                yield {"messages": system + thread}
            continue
        messages = store.db.query("SELECT * FROM messages WHERE conversation_id = ? ORDER BY created_at, rowid",
                                  [c["id"]])
        row = {k: c[k] for k in ("id", "title", "system_prompt", "model", "created_at", "updated_at",
                                 "current_leaf")}
        row["archived"] = bool(c["archived"])
        row["messages"] = [{k: _maybe_json(k, m[k]) for k in MESSAGE_FIELDS} for m in messages]
        yield row


def _pref_rows(store: Store, fmt: str):
    for p in store.preference_pairs():
        if fmt == "trl":
            yield {"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                   "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        else:
            yield {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                   "chosen_model": p["chosen_model"], "rejected_model": p["rejected_model"],
                   "annotator": p["annotator"], "created_at": p["created_at"]}


def _ranking_rows(store: Store, fmt: str):
    for r in store.rankings():
        comparison = store.comparison(r["comparison_id"])
        yield {"prompt": store.prompt_messages(comparison["conversation_id"], comparison["parent_id"]),
               "kind": r["kind"], "vote": r["vote"], "annotator": r["annotator"], "created_at": r["created_at"],
               "candidates": [{"content": m["content"], "model": m["model"], "settings": m["settings"],
                               "rank": r["ranks"][m["id"]], "flags": store.flags(m["id"])}
                              for m in comparison["candidates"]]}


def _maybe_json(key, value):
    return json.loads(value) if key in ("settings", "timings") and isinstance(value, str) else value


# -- import ------------------------------------------------------------------------------------------
def import_file(store: Store, kind: str, path: str) -> dict:
    """Check every line of `path`, then write them all in one transaction. Returns counts."""
    if kind not in ("conversations", "prefs"):
        raise ParleyError(f"cannot import {kind!r}: use conversations or prefs")
    check = _check_conversation if kind == "conversations" else _check_pref
    rows, errors = [], []
    for number, value, error in read_jsonl(path):
        if error is None:
            error = check(value)
        if error:
            errors.append(f"{path}:{number}: {error}")
        else:
            rows.append(value)
    if errors:
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise ParleyError(f"{errors[0]}{more}; nothing was imported")
    with store.transaction():
        return _write_conversations(store, rows) if kind == "conversations" else _write_prefs(store, rows, path)


def read_jsonl(path: str):
    """(line number, parsed value, error) for each non-blank line; a line's error is None if it parsed."""
    file = Path(path)
    if not file.is_file():
        raise ParleyError(f"{path} does not exist: give the path of a .jsonl file")
    with open(file, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the over-long line
                    raw = f.readline(MAX_LINE)
                yield number, None, f"line is longer than {MAX_LINE // 2**20} MiB: split the record or check the file"
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}): " \
                                    "save the file as UTF-8"
                continue
            try:
                yield number, json.loads(text), None
            except json.JSONDecodeError as e:
                yield number, None, f"invalid JSON ({e.msg} at column {e.colno}): each line must be one JSON object"


def _check_message(m, where: str) -> str | None:
    if not isinstance(m, dict):
        return f"{where} must be an object with role and content"
    if m.get("role") not in ROLES:
        return f"{where} has role {m.get('role')!r}: use one of {', '.join(ROLES)}"
    if not isinstance(m.get("content"), str):
        return f"{where} needs content as text"
    return None


def _check_messages(messages, where: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{where} must be a non-empty list of messages"
    for i, m in enumerate(messages):
        error = _check_message(m, f"{where}[{i}]")
        if error:
            return error
    return None


def _check_conversation(row) -> str | None:
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    if "id" not in row:  # the trl form: a plain list of messages
        return _check_messages(row.get("messages"), "messages")
    if not isinstance(row["id"], str) or not row["id"]:
        return "id must be a non-empty string"
    error = _check_messages(row.get("messages"), "messages") if row.get("messages") != [] else None
    if error:
        return error
    seen = set()
    for i, m in enumerate(row.get("messages", [])):
        if not isinstance(m.get("id"), str):
            return f"messages[{i}] needs an id"
        if m.get("parent_id") is not None and m["parent_id"] not in seen:
            return (f"messages[{i}] has parent_id {m['parent_id']!r}, which is not an earlier message of this "
                    "conversation")
        if m.get("status", "complete") not in ("complete", "partial"):
            return f"messages[{i}] has status {m.get('status')!r}: use complete or partial"
        seen.add(m["id"])
    if row.get("current_leaf") is not None and row["current_leaf"] not in seen:
        return f"current_leaf {row['current_leaf']!r} is not one of the conversation's messages"
    return None


def _response_text(value, field: str) -> tuple[str | None, str | None]:
    if isinstance(value, list):
        if len(value) != 1 or _check_message(value[0], field) or value[0]["role"] != "assistant":
            return None, f"{field} must be a text or a list of one assistant message"
        value = value[0]["content"]
    if not isinstance(value, str):
        return None, f"{field} must be a text or a list of one assistant message"
    if not value.strip():
        return None, f"{field} is empty: a preference needs two non-empty replies"
    return value, None


def _check_pref(row) -> str | None:
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    for field in ("prompt", "chosen", "rejected"):
        if field not in row:
            return f"missing {field!r}: a preference line needs prompt, chosen and rejected"
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    error = _check_messages(prompt, "prompt")
    if error:
        return error
    chosen, error = _response_text(row["chosen"], "chosen")
    if error:
        return error
    rejected, error = _response_text(row["rejected"], "rejected")
    if error:
        return error
    if chosen == rejected:
        return "chosen and rejected are the same text: a preference needs two different replies"
    row["_prompt"], row["_chosen"], row["_rejected"] = prompt, chosen, rejected
    return None


def _write_conversations(store: Store, rows: list[dict]) -> dict:
    added = skipped = 0
    for row in rows:
        if "id" not in row:  # trl: one linear thread
            system = row["messages"][0]["content"] if row["messages"][0]["role"] == "system" else ""
            cid = store.create_conversation(system_prompt=system)
            for m in row["messages"][1 if system else 0:]:
                store.add_message(cid, m["role"], m["content"])
            added += 1
            continue
        if list(store.db.query("SELECT 1 FROM conversations WHERE id = ?", [row["id"]])):
            skipped += 1
            continue
        store.db["conversations"].insert({
            "id": row["id"], "title": row.get("title", ""), "system_prompt": row.get("system_prompt", ""),
            "model": row.get("model"), "created_at": row.get("created_at") or now(),
            "updated_at": row.get("updated_at") or now(), "archived": int(bool(row.get("archived")))})
        for m in row.get("messages", []):
            store.add_message(row["id"], m["role"], m["content"], m.get("parent_id"), model=m.get("model"),
                              settings=m.get("settings"), prompt_tokens=m.get("prompt_tokens"),
                              completion_tokens=m.get("completion_tokens"), timings=m.get("timings"),
                              finish_reason=m.get("finish_reason"), status=m.get("status", "complete"),
                              created_at=m.get("created_at"), message_id=m["id"], make_current=False)
        store.conn.execute("UPDATE conversations SET current_leaf = ?, updated_at = ? WHERE id = ?",
                           (row.get("current_leaf"), row.get("updated_at") or now(), row["id"]))
        added += 1
    return {"conversations": added, "skipped": skipped}


def _write_prefs(store: Store, rows: list[dict], path: str) -> dict:
    """Rows with the same prompt share one conversation, so their pairs group by prompt."""
    contexts: dict[str, tuple[str, str | None, dict]] = {}
    for row in rows:
        key = json.dumps(row["_prompt"], sort_keys=True)
        if key not in contexts:
            prompt = row["_prompt"]
            system = prompt[0]["content"] if prompt[0]["role"] == "system" else ""
            cid = store.create_conversation(title=f"imported from {Path(path).name}", system_prompt=system)
            parent = None
            for m in prompt[1 if system else 0:]:
                parent = store.add_message(cid, m["role"], m["content"], parent)
            contexts[key] = (cid, parent, {})
        cid, parent, replies = contexts[key]
        ids = []
        for text, model in ((row["_chosen"], row.get("chosen_model")), (row["_rejected"], row.get("rejected_model"))):
            if (text, model) not in replies:
                replies[(text, model)] = store.add_message(cid, "assistant", text, parent, model=model,
                                                           make_current=False)
            ids.append(replies[(text, model)])
        comparison = store.create_comparison(cid, parent, ids)
        store.rank(comparison, {ids[0]: 1, ids[1]: 2}, row.get("annotator") or f"import:{Path(path).name}",
                   created_at=row.get("created_at"))
    return {"pairs": len(rows), "prompts": len(contexts)}
