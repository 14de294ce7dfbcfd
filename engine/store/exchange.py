"""Import and export of the store's data as JSON Lines, to take it elsewhere and back.

Formats (one JSON object per line):
  conversations/jsonl  a conversation with every message of its tree (ids kept)
  conversations/trl    {"messages": [...]}: the current thread, system prompt first (SFT data)
  prefs/jsonl          {"prompt": [messages], "chosen": text, "rejected": text, models, annotator, time}
  prefs/trl            TRL's conversational preference format: chosen/rejected as assistant messages
  rankings/jsonl       a ranking with its prompt and every candidate's text, settings, rank and flags

An import reads and checks every line first; one bad line refuses the whole file with
`FILE:LINE: what is wrong`, and nothing is written. Export, import, export gives the same file, and
importing a file again adds nothing: a conversation whose id is in the store, or a preference pair or
ranking with the same prompt, replies and annotator (any annotator, for a line that names none), is
skipped and counted as such.
"""
import json
from datetime import datetime
from pathlib import Path

from engine.errors import ParleyError
from engine.files import atomic_write_text, check_output_file
from engine.settings import Settings
from engine.store.store import FLAGS, ROLES, VOTES, Store, now

# A line is one record, read whole into memory: 16 MiB holds the longest real conversation many
# times over and keeps a file without newlines from filling the memory.
MAX_LINE = 16 * 2**20
# How deeply a line's arrays and objects may nest. A valid line nests 5 deep (row, messages, message,
# settings, stop list); 32 leaves room for a tool's own timings and keeps every reader far below
# Python's recursion limit (100 000 "[" would otherwise end in a RecursionError, not a message).
MAX_DEPTH = 32
FORMATS = {"conversations": ("jsonl", "trl"), "prefs": ("jsonl", "trl"), "rankings": ("jsonl",)}


# -- export ------------------------------------------------------------------------------------------
def export(store: Store, kind: str, fmt: str, out: str) -> int:
    """Write `kind` in format `fmt` to the file `out` ("-" for standard output); return the line count."""
    if fmt not in FORMATS.get(kind, ()):
        raise ParleyError(f"cannot export {kind} as {fmt!r}: use {' or '.join(FORMATS.get(kind, ('jsonl',)))}")
    if out != "-":
        check_output_file(Path(out), "export.jsonl")
    rows = {"conversations": _conversation_rows, "prefs": _pref_rows, "rankings": _ranking_rows}[kind](store, fmt)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if out == "-":
        print(text, end="")
        return text.count("\n")
    try:
        atomic_write_text(out, text)
    except OSError as e:
        raise ParleyError(f"cannot write {out} ({e.strerror or e}): free space or fix the permissions of "
                          f"{Path(out).parent}, or write elsewhere; nothing was written") from None
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
    """Check every line of `path` (alone, then against the others and the store), then write them
    all in one transaction. Returns the counts of what was added and of what was `skipped` (there already)."""
    if kind not in IMPORTERS:
        raise ParleyError(f"cannot import {kind!r}: use {', '.join(IMPORTERS)}")
    check, against, write = IMPORTERS[kind]
    rows, errors = [], []
    for number, value, error in read_jsonl(path):
        if error is None:
            error = check(value)
        if error:
            errors.append(f"{path}:{number}: {error}")
        else:
            rows.append((number, value))
    if not errors:
        errors = [f"{path}:{number}: {error}" for number, error in against(store, rows)]
    if errors:
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise ParleyError(f"{errors[0]}{more}; nothing was imported")
    with store.transaction():
        return write(store, rows, path)


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NotJSON(f"{name} is not JSON: write null or a number")


def read_jsonl(path: str):
    """(line number, parsed value, error) for each non-blank line; a line's error is None if it parsed."""
    file = Path(path)
    if file.is_dir():
        raise ParleyError(f"{path} is a folder: give the path of a .jsonl file")
    if not file.exists():
        raise ParleyError(f"{path} does not exist: give the path of a .jsonl file")
    if not file.is_file():
        raise ParleyError(f"{path} is not a regular file: give the path of a .jsonl file")
    try:
        f = open(file, "rb")
    except OSError as e:
        raise ParleyError(f"{path} cannot be read ({e.strerror}): fix its permissions") from None
    with f:
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
                value = json.loads(text, parse_constant=_refuse_constant)
            except json.JSONDecodeError as e:
                yield number, None, f"invalid JSON ({e.msg} at column {e.colno}): each line must be one JSON object"
                continue
            except _NotJSON as e:
                yield number, None, str(e)
                continue
            except RecursionError:
                value = None
                error = _too_deep()
            else:
                error = _shape_error(value)
            yield number, value if error is None else None, error


def _too_deep() -> str:
    return f"nested more than {MAX_DEPTH} deep: a Parley line nests only a few levels; check the file"


def _shape_error(value) -> str | None:
    """What no field of any line may be: nested past MAX_DEPTH, or text SQLite cannot store (a lone
    UTF-16 surrogate such as \\ud800, which is valid JSON but not Unicode text)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                return _too_deep()
            items = [x for kv in v.items() for x in kv] if isinstance(v, dict) else v
            stack.extend((x, depth + 1) for x in items)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return (f"text {_show(v)} holds a lone surrogate (\\u{ord(v[e.start]):04x}), which is not Unicode "
                        "text and cannot be stored: fix or remove that \\u escape")
    return None


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# A field's rule: (test, what it must be, whether null is allowed). A missing field takes its default.
def _is_text(v):
    return isinstance(v, str)


def _is_name(v):
    return isinstance(v, str) and bool(v)


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _is_time(v):
    try:
        datetime.fromisoformat(v)
        return True
    except (TypeError, ValueError):
        return False


def _is_numbers(v):
    return isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool) or x is None
                                       for x in v.values())


TEXT, NAME = (_is_text, "text"), (_is_name, "non-empty text")
TIME = (_is_time, "an ISO 8601 time (e.g. 2024-05-01T12:00:00+00:00)")
CONVERSATION_RULES = {"id": (*NAME, False), "title": (*TEXT, False), "system_prompt": (*TEXT, False),
                      "model": (*TEXT, True), "created_at": (*TIME, False), "updated_at": (*TIME, False),
                      "archived": (lambda v: isinstance(v, bool), "true or false", False),
                      "current_leaf": (*TEXT, True)}
MESSAGE_RULES = {"id": (*NAME, False), "parent_id": (*TEXT, True), "model": (*TEXT, True),
                 "settings": (lambda v: isinstance(v, dict), "an object of decoding settings", True),
                 "prompt_tokens": (_is_count, "a whole number from 0", True),
                 "completion_tokens": (_is_count, "a whole number from 0", True),
                 "timings": (_is_numbers, "an object of numbers", True), "finish_reason": (*TEXT, True),
                 "status": (lambda v: v in ("complete", "partial"), "complete or partial", False),
                 "created_at": (*TIME, False)}
PREF_RULES = {"chosen_model": (*TEXT, True), "rejected_model": (*TEXT, True), "annotator": (*NAME, True),
              "created_at": (*TIME, True)}
RANKING_RULES = {"kind": (lambda v: v in ("order", "vote"), "order or vote", False),
                 "vote": (lambda v: v in VOTES, f"one of {', '.join(VOTES)}", True),
                 "annotator": (*NAME, True), "created_at": (*TIME, True),
                 "candidates": (lambda v: isinstance(v, list) and len(v) >= 2, "a list of two or more candidates",
                                False)}
CANDIDATE_RULES = {"content": (*TEXT, False), "model": (*TEXT, True),
                   "settings": (lambda v: isinstance(v, dict), "an object of decoding settings", True),
                   "rank": (lambda v: _is_count(v) and v >= 1, "a whole number from 1 (best)", False),
                   "flags": (lambda v: isinstance(v, list) and all(f in FLAGS for f in v) and len(set(v)) == len(v),
                             f"a list of distinct flags from {', '.join(FLAGS)}", False)}


def _check_fields(obj: dict, rules: dict, where: str = "") -> str | None:
    for key, (ok, what, nullable) in rules.items():
        if key in obj and not (obj[key] is None and nullable) and not ok(obj[key]):
            return f"{where}{key} must be {what}{' or null' if nullable else ''}, not {_show(obj[key])}"
    if isinstance(obj.get("settings"), dict):
        try:
            Settings.from_dict(obj["settings"])
        except ParleyError as e:
            return f"{where}settings: {e}"
    return None


def _check_message(m, where: str) -> str | None:
    if not isinstance(m, dict):
        return f"{where} must be an object with role and content"
    if m.get("role") not in ROLES:
        return f"{where} has role {m.get('role')!r}: use one of {', '.join(ROLES)}"
    if not isinstance(m.get("content"), str):
        return f"{where} needs content as text"
    return None


def _check_messages(messages, where: str, empty: bool = False) -> str | None:
    if not isinstance(messages, list) or not (messages or empty):
        return f"{where} must be a {'' if empty else 'non-empty '}list of messages"
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
    error = _check_fields(row, CONVERSATION_RULES) or _check_messages(row.get("messages", []), "messages", empty=True)
    if error:
        return error
    seen = set()
    for i, m in enumerate(row.get("messages", [])):
        error = _check_fields(m, MESSAGE_RULES, f"messages[{i}].")
        if error:
            return error
        if "id" not in m:
            return f"messages[{i}] needs an id"
        if m["id"] in seen:
            return f"messages[{i}] has the id {_show(m['id'])} of an earlier message: each message needs its own id"
        if m.get("parent_id") is not None and m["parent_id"] not in seen:
            return (f"messages[{i}] has parent_id {m['parent_id']!r}, which is not an earlier message of this "
                    "conversation")
        seen.add(m["id"])
    if row.get("current_leaf") is not None and row["current_leaf"] not in seen:
        return f"current_leaf {row['current_leaf']!r} is not one of the conversation's messages"
    return None


def _conversation_ids_against(store: Store, rows: list) -> list[tuple[int, str]]:
    """Ids must be unique across the file and, for a conversation not in the store yet, new to it."""
    errors, conversations, messages = [], {}, {}
    for number, row in rows:
        if "id" not in row:
            continue
        if row["id"] in conversations:
            errors.append((number, f"conversation id {_show(row['id'])} is also on line {conversations[row['id']]}: "
                                   "each conversation needs its own id"))
            continue
        conversations[row["id"]] = number
        if _exists(store, "conversations", row["id"]):
            continue   # there already: skipped whole
        for m in row.get("messages", []):
            if m["id"] in messages:
                errors.append((number, f"message id {_show(m['id'])} is also on line {messages[m['id']]}: "
                                       "each message needs its own id"))
                break
            messages[m["id"]] = number
            if _exists(store, "messages", m["id"]):
                errors.append((number, f"message id {_show(m['id'])} is in the store already, in another "
                                       "conversation: give the message a new id"))
                break
    return errors


def _exists(store: Store, table: str, key: str) -> bool:
    return store.conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", [key]).fetchone() is not None


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


def _prompt(row: dict, empty: bool = False) -> tuple[list | None, str | None]:
    if "prompt" not in row:
        return None, "missing 'prompt'"
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    error = _check_messages(prompt, "prompt", empty)
    return (None, error) if error else ([{"role": m["role"], "content": m["content"]} for m in prompt], None)


def _check_pref(row) -> str | None:
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    for field in ("prompt", "chosen", "rejected"):
        if field not in row:
            return f"missing {field!r}: a preference line needs prompt, chosen and rejected"
    prompt, error = _prompt(row)
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
    error = _check_fields(row, PREF_RULES)
    if error:
        return error
    row["_prompt"], row["_chosen"], row["_rejected"] = prompt, chosen, rejected
    return None


def _check_ranking(row) -> str | None:
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    for field in ("prompt", "kind", "candidates"):
        if field not in row:
            return f"missing {field!r}: a ranking line needs prompt, kind and candidates"
    prompt, error = _prompt(row, empty=True)
    error = error or _check_fields(row, RANKING_RULES)
    if error:
        return error
    if (row["kind"] == "vote") != (row.get("vote") is not None):
        return "vote goes with kind 'vote' (and only with it): give both, or kind 'order' and no vote"
    for i, c in enumerate(row["candidates"]):
        if not isinstance(c, dict) or "content" not in c or "rank" not in c:
            return f"candidates[{i}] must be an object with content and rank"
        error = _check_fields(c, CANDIDATE_RULES, f"candidates[{i}].")
        if error:
            return error
    replies = [_reply_key(c) for c in row["candidates"]]
    if len(set(replies)) != len(replies):
        return "two candidates are the same reply (content, model and settings): each candidate must differ"
    row["_prompt"] = prompt
    return None


def _reply_key(c: dict) -> tuple:
    return c["content"], c.get("model"), json.dumps(c.get("settings"), sort_keys=True)


def _no_check(store: Store, rows: list) -> list:
    return []


def _write_conversations(store: Store, rows: list, path: str) -> dict:
    added = skipped = 0
    for _, row in rows:
        if "id" not in row:  # trl: one linear thread
            system = row["messages"][0]["content"] if row["messages"][0]["role"] == "system" else ""
            cid = store.create_conversation(system_prompt=system)
            for m in row["messages"][1 if system else 0:]:
                store.add_message(cid, m["role"], m["content"])
            added += 1
            continue
        if _exists(store, "conversations", row["id"]):
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


def _prompt_key(prompt: list[dict]) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


class _Contexts:
    """The conversation each imported prompt lives in (rows with one prompt share it), and the
    replies already written under it."""
    def __init__(self, store: Store, path: str):
        self.store, self.path, self.known = store, path, {}

    def get(self, prompt: list[dict]) -> tuple[str, str | None, dict]:
        key = _prompt_key(prompt)
        if key not in self.known:
            system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else ""
            cid = self.store.create_conversation(title=f"imported from {Path(self.path).name}", system_prompt=system)
            parent = None
            for m in prompt[1 if system else 0:]:
                parent = self.store.add_message(cid, m["role"], m["content"], parent)
            self.known[key] = (cid, parent, {})
        return self.known[key]


class _Seen:
    """Judgements already made: (prompt, replies, annotator). A line that names no annotator is the
    same judgement as any annotator's."""
    def __init__(self, keys=()):
        self.keys, self.any = set(), set()
        for key in keys:
            self.add(*key)

    def add(self, prompt_key: str, replies: tuple, annotator: str | None) -> None:
        self.keys.add((prompt_key, replies, annotator))
        self.any.add((prompt_key, replies))

    def __contains__(self, key) -> bool:
        prompt_key, replies, annotator = key
        return (prompt_key, replies) in self.any if annotator is None else key in self.keys


def _write_prefs(store: Store, rows: list, path: str) -> dict:
    """Rows with the same prompt share one conversation, so their pairs group by prompt."""
    seen = _Seen((_prompt_key(p["prompt"]), (p["chosen"], p["rejected"]), p["annotator"])
                 for p in store.preference_pairs())
    contexts, added, skipped, prompts = _Contexts(store, path), 0, 0, set()
    for _, row in rows:
        key = (_prompt_key(row["_prompt"]), (row["_chosen"], row["_rejected"]), row.get("annotator"))
        if key in seen:
            skipped += 1
            continue
        seen.add(*key)
        cid, parent, replies = contexts.get(row["_prompt"])
        prompts.add(key[0])
        ids = []
        for text, model in ((row["_chosen"], row.get("chosen_model")), (row["_rejected"], row.get("rejected_model"))):
            if (text, model) not in replies:
                replies[(text, model)] = store.add_message(cid, "assistant", text, parent, model=model,
                                                           make_current=False)
            ids.append(replies[(text, model)])
        comparison = store.create_comparison(cid, parent, ids)
        store.rank(comparison, {ids[0]: 1, ids[1]: 2}, row.get("annotator") or f"import:{Path(path).name}",
                   created_at=row.get("created_at"))
        added += 1
    return {"pairs": added, "prompts": len(prompts), "skipped": skipped}


def _write_rankings(store: Store, rows: list, path: str) -> dict:
    """A ranking's candidates become replies to its prompt; a later line ranking the same replies
    ranks the same comparison again."""
    def stored():
        for r in store.rankings():
            comparison = store.comparison(r["comparison_id"])
            yield (_prompt_key(store.prompt_messages(comparison["conversation_id"], comparison["parent_id"])),
                   tuple(m["content"] for m in comparison["candidates"]), r["annotator"])
    seen, contexts = _Seen(stored()), _Contexts(store, path)
    comparisons, added, skipped = {}, 0, 0
    for _, row in rows:
        candidates = row["candidates"]
        key = (_prompt_key(row["_prompt"]), tuple(c["content"] for c in candidates), row.get("annotator"))
        if key in seen:
            skipped += 1
            continue
        seen.add(*key)
        cid, parent, _ = contexts.get(row["_prompt"])
        replies = (key[0], tuple(_reply_key(c) for c in candidates))
        if replies not in comparisons:
            ids = [store.add_message(cid, "assistant", c["content"], parent, model=c.get("model"),
                                     settings=c.get("settings"), make_current=False) for c in candidates]
            comparisons[replies] = (store.create_comparison(cid, parent, ids), ids)
        comparison, ids = comparisons[replies]
        rid = store.rank(comparison, {mid: c["rank"] for mid, c in zip(ids, candidates)},
                         row.get("annotator") or f"import:{Path(path).name}", kind=row["kind"], vote=row.get("vote"),
                         created_at=row.get("created_at"))
        for mid, c in zip(ids, candidates):
            for flag in c.get("flags", []):
                store.flag(mid, flag, rid)
        added += 1
    return {"rankings": added, "skipped": skipped}


IMPORTERS = {"conversations": (_check_conversation, _conversation_ids_against, _write_conversations),
             "prefs": (_check_pref, _no_check, _write_prefs),
             "rankings": (_check_ranking, _no_check, _write_rankings)}
