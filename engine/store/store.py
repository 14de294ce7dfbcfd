"""Parley's data: conversations as message trees, comparisons, rankings, preference pairs, training
runs and their metrics, in one SQLite database (WAL mode, foreign keys on).

Every multi-row change runs in one `BEGIN IMMEDIATE` transaction, so a crash leaves either all of
it or none, and a second process (a trainer writing metrics) waits for the lock instead of
failing. A `Store` is used from one thread; open another for another thread or process.
"""
import contextlib
import itertools
import json
import math
import os
import secrets
import socket
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from sqlite_utils import Database

from engine.errors import ParleyError
from engine.paths import database_path
from engine.store import schema

ROLES = ("system", "user", "assistant")
FLAGS = ("fails_instruction", "made_up_facts", "unsafe", "both_bad")
VOTES = ("best", "tie", "both_bad")
_LEAF = object()  # "attach to the conversation's current leaf"
# How long a write waits for another process's (a trainer logging metrics, a second app) before it
# gives up and says the database is locked: long enough for any one transaction of theirs.
BUSY_TIMEOUT_S = 30


def now() -> str:
    # Microseconds: "most recent first" must not tie between two quick writes.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_id() -> str:
    """Sortable, unique across machines: milliseconds since 1970 in hex, then 40 random bits."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(5)}"


class Store:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else database_path()
        _make_folder(self.path.parent)
        conn = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
            _use_wal(conn)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")   # a commit survives a crash of the machine, too
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            found = schema.version(conn)
            if found > schema.LATEST:
                raise ParleyError(f"{self.path} was written by a newer Parley (schema {found}; this one knows up "
                                  f"to {schema.LATEST}): upgrade Parley, or set PARLEY_HOME to use another database")
            if found == 0 and conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'").fetchone():
                raise ParleyError(f"{self.path} has tables but no schema version (user_version 0), so Parley "
                                  "cannot tell what it holds: move it aside, or set PARLEY_HOME to use another database")
            schema.migrate(conn)
            _mark_interrupted(conn)
        except (sqlite3.Error, ParleyError) as e:
            if conn is not None:
                conn.close()
            if isinstance(e, ParleyError):
                raise
            raise store_error(self.path, e) or ParleyError(
                f"{self.path} is not a usable SQLite database ({e}): move it aside and start again") from None
        self.conn = conn
        self.db = Database(conn)

    def close(self) -> None:
        """Close the connection (again: nothing); the last one to close folds the WAL into the file."""
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        """One atomic change; nested blocks become savepoints of the outer transaction. A write the
        disk, the file's permissions or another process's lock refuses is a ParleyError that says so
        (SQLite may have rolled the transaction back itself: there is then nothing left to undo)."""
        outer = not self.conn.in_transaction
        begin, undo, end = (("BEGIN IMMEDIATE", "ROLLBACK", "COMMIT") if outer else
                            ("SAVEPOINT nested", "ROLLBACK TO nested", "RELEASE nested"))
        try:
            self.conn.execute(begin)
            try:
                yield
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute(undo)
                    if not outer:
                        self.conn.execute(end)
                raise
            self.conn.execute(end)
        except sqlite3.OperationalError as e:
            if outer and self.conn.in_transaction:   # COMMIT failed: undo it all
                self.conn.execute("ROLLBACK")
            error = store_error(self.path, e)
            if error is None:
                raise
            raise error from None

    def _one(self, sql: str, params=(), what: str = "row") -> dict:
        rows = list(self.db.query(sql, params))
        if not rows:
            raise ParleyError(f"no {what} matches {params[0] if params else ''!r}: check the id")
        return rows[0]

    # -- models and preferences ---------------------------------------------------------------------
    def add_model(self, name: str, path: str | Path, kind: str = "hf", notes: str = "", *,
                  parent: str | None = None, run_id: str | None = None) -> None:
        """`parent` and `run_id`: for a model trained here, the model it started from and its run."""
        if not name or not name.strip():
            raise ParleyError("a model needs a name: give a non-empty name")
        try:
            with self.transaction():
                self.db["models"].insert({"name": name, "path": str(path), "kind": kind, "added_at": now(),
                                          "notes": notes, "parent": parent, "run_id": run_id})
        except sqlite3.IntegrityError:
            raise ParleyError(f"a model named {name!r} exists already: pick another name") from None

    def models(self) -> list[dict]:
        return list(self.db.query("SELECT * FROM models ORDER BY added_at, name"))

    def model(self, name: str) -> dict | None:
        return next(iter(self.db.query("SELECT * FROM models WHERE name = ?", [name])), None)

    def set_lineage(self, name: str, parent: str | None, run_id: str | None) -> None:
        """A registered model written again by another run: it now comes from that run."""
        with self.transaction():
            self.conn.execute("UPDATE models SET parent = ?, run_id = ? WHERE name = ?", (parent, run_id, name))

    def model_by_name_or_path(self, model: str) -> dict | None:
        """The registered model a reply's `model` names: by its name, else by its directory (the app
        names a model by the path it was opened with as often as by its name)."""
        path = str(Path(model).expanduser().resolve()) if model else None
        return next(iter(self.db.query("SELECT * FROM models WHERE name = ? OR path = ? ORDER BY name = ? DESC "
                                       "LIMIT 1", [model, path, model])), None)

    def lineage(self, model: str) -> list[dict]:
        """The model and the ones it was trained from, newest first: each registered model with its
        parent and run (the run's kind and status), up to the first model not trained here."""
        chain, seen = [], set()
        while model and model not in seen:
            seen.add(model)
            row = self.model_by_name_or_path(model)
            if row is None:
                chain.append({"name": model, "parent": None, "run_id": None, "run": None})
                break
            row["run"] = self.run(row["run_id"]) if row["run_id"] else None
            chain.append(row)
            model = row["parent"]
        return chain

    def set_preference(self, key: str, value) -> None:
        with self.transaction():
            self.db["preferences"].insert({"key": key, "value": json.dumps(value)}, replace=True)

    def preference(self, key: str, default=None):
        row = next(iter(self.db.query("SELECT value FROM preferences WHERE key = ?", [key])), None)
        return default if row is None else json.loads(row["value"])

    # -- conversations ------------------------------------------------------------------------------
    def create_conversation(self, title: str = "", system_prompt: str = "", model: str | None = None) -> str:
        cid, stamp = new_id(), now()
        with self.transaction():
            self.db["conversations"].insert({"id": cid, "title": title, "system_prompt": system_prompt, "model": model,
                                             "created_at": stamp, "updated_at": stamp})
        return cid

    def conversation(self, conversation_id: str) -> dict:
        return self._one("SELECT * FROM conversations WHERE id = ?", [conversation_id], "conversation")

    def conversations(self, archived: bool = False) -> list[dict]:
        return list(self.db.query("SELECT * FROM conversations WHERE archived = ? ORDER BY updated_at DESC, rowid DESC",
                                  [int(archived)]))

    def update_conversation(self, conversation_id: str, **fields) -> None:
        """Change title, system_prompt, model or archived."""
        allowed = {"title", "system_prompt", "model", "archived"}
        if not fields or set(fields) - allowed:
            raise ParleyError(f"a conversation's {sorted(set(fields) - allowed)} cannot be set: "
                              f"use {', '.join(sorted(allowed))}")
        self.conversation(conversation_id)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction():
            self.conn.execute(f"UPDATE conversations SET {sets}, updated_at = ? WHERE id = ?",
                              [*fields.values(), now(), conversation_id])

    def archive_conversation(self, conversation_id: str, archived: bool = True) -> None:
        self.update_conversation(conversation_id, archived=int(archived))

    def delete_conversation(self, conversation_id: str) -> None:
        with self.transaction():
            self.conn.execute("UPDATE conversations SET current_leaf = NULL WHERE id = ?", [conversation_id])
            self.conn.execute("DELETE FROM conversations WHERE id = ?", [conversation_id])

    # -- messages: a tree per conversation ----------------------------------------------------------
    def add_message(self, conversation_id: str, role: str, content: str, parent_id=_LEAF, *,
                    model: str | None = None, settings: dict | None = None, prompt_tokens: int | None = None,
                    completion_tokens: int | None = None, timings: dict | None = None,
                    finish_reason: str | None = None, status: str = "complete", created_at: str | None = None,
                    message_id: str | None = None, make_current: bool = True, run_id: str | None = None) -> str:
        """Append a message under `parent_id` (default: the current leaf) and make it the leaf."""
        if role not in ROLES:
            raise ParleyError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ParleyError("message content must be text")
        conversation = self.conversation(conversation_id)
        if parent_id is _LEAF:
            parent_id = conversation["current_leaf"]
        if parent_id is not None and self.message(parent_id)["conversation_id"] != conversation_id:
            raise ParleyError(f"message {parent_id!r} belongs to another conversation")
        mid, stamp = message_id or new_id(), created_at or now()
        with self.transaction():
            # Settings and timings go in as Parley's own JSON text: sqlite-utils would encode dicts its way.
            self.db["messages"].insert({
                "id": mid, "conversation_id": conversation_id, "parent_id": parent_id, "role": role,
                "content": content, "model": model, "settings": _json(settings), "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens, "timings": _json(timings), "finish_reason": finish_reason,
                "status": status, "created_at": stamp, "run_id": run_id})
            if make_current:
                self.conn.execute("UPDATE conversations SET current_leaf = ?, updated_at = ? WHERE id = ?",
                                  (mid, now(), conversation_id))
        return mid

    def start_reply(self, conversation_id: str, parent_id, model: str | None, settings: dict | None,
                    make_current: bool = True, content: str = "") -> str:
        """An assistant message that is still being generated: kept, marked partial, if the app dies.
        `content`: the text it starts with (a continuation's tokens taken from another reply). It
        keeps the run that trained `model`, when the model was trained here (its lineage)."""
        registered = self.model_by_name_or_path(model) if model else None
        return self.add_message(conversation_id, "assistant", content, parent_id, model=model, settings=settings,
                                status="partial", make_current=make_current,
                                run_id=registered["run_id"] if registered else None)

    def save_partial(self, message_id: str, content: str) -> None:
        with self.transaction():
            self.conn.execute("UPDATE messages SET content = ? WHERE id = ? AND status = 'partial'",
                              (content, message_id))

    def finish_reply(self, message_id: str, content: str, finish_reason: str, *, prompt_tokens: int | None = None,
                     completion_tokens: int | None = None, timings: dict | None = None,
                     settings: dict | None = None, segments: list[dict] | None = None) -> None:
        """`settings`: those the reply started with; `segments`: [{"from": token index, "settings"}, ...],
        the settings in force from each token on, when they were changed while it was generated."""
        with self.transaction():
            self.conn.execute(
                "UPDATE messages SET content = ?, finish_reason = ?, status = 'complete', prompt_tokens = ?, "
                "completion_tokens = ?, timings = ?, settings = COALESCE(?, settings), "
                "segments = COALESCE(?, segments) WHERE id = ?",
                (content, finish_reason, prompt_tokens, completion_tokens, _json(timings), _json(settings),
                 _json(segments), message_id))

    def save_reply_tokens(self, message_id: str, tokens: list[dict], forced: int = 0) -> None:
        """Keep a reply's tokens, as `reply_tokens` gives them back (`step` is their place in the list;
        missing fields are empty), the first `forced` of them taken rather than generated. A reply
        discarded while it was generated has no row left to keep them for: nothing is written."""
        if not 0 <= forced <= len(tokens):
            raise ParleyError(f"forced = {forced} is out of range: a reply of {len(tokens)} tokens forces "
                              f"0 to {len(tokens)} of them")
        rows = [_token_row(t, i) for i, t in enumerate(tokens)]
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO reply_tokens (message_id, forced, tokens) "
                "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM messages WHERE id = ?)",
                (message_id, forced, json.dumps(rows, separators=(",", ":"), ensure_ascii=False), message_id))

    def reply_tokens(self, message_id: str) -> dict | None:
        """{"forced": how many of the first tokens were taken, "tokens": [{step, token_id, piece, text,
        logprob, sampled_logprob, before, after}]}, `before`/`after` lists of {token_id, piece, prob};
        None for a message without them (written by hand, imported, or before schema 4)."""
        row = next(iter(self.db.query("SELECT forced, tokens FROM reply_tokens WHERE message_id = ?",
                                      [message_id])), None)
        if row is None:
            return None
        return {"forced": row["forced"], "tokens": [_token_dict(i, t) for i, t in enumerate(json.loads(row["tokens"]))]}

    def edit_message(self, message_id: str, content: str) -> str:
        """Editing makes a sibling with the new content; the original stays."""
        old = self.message(message_id)
        return self.add_message(old["conversation_id"], old["role"], content, old["parent_id"], model=old["model"])

    def message(self, message_id: str) -> dict:
        return _decode(self._one("SELECT * FROM messages WHERE id = ?", [message_id], "message"))

    def thread(self, conversation_id: str, leaf_id: str | None = None) -> list[dict]:
        """The messages from the root to `leaf_id` (default: the current leaf), in order."""
        leaf = leaf_id or self.conversation(conversation_id)["current_leaf"]
        if leaf is None:
            return []
        rows = self.db.query(
            "WITH RECURSIVE path(id, depth) AS (SELECT ?, 0 UNION ALL "
            "SELECT m.parent_id, path.depth + 1 FROM messages m JOIN path ON m.id = path.id "
            "WHERE m.parent_id IS NOT NULL) "
            "SELECT messages.* FROM path JOIN messages ON messages.id = path.id ORDER BY path.depth DESC", [leaf])
        return [_decode(r) for r in rows]

    def children(self, conversation_id: str, parent_id: str | None) -> list[dict]:
        where = "parent_id = ?" if parent_id is not None else "parent_id IS NULL AND conversation_id = ?"
        rows = self.db.query(f"SELECT * FROM messages WHERE {where} ORDER BY created_at, rowid",
                             [parent_id if parent_id is not None else conversation_id])
        return [_decode(r) for r in rows]

    def siblings(self, message_id: str) -> list[dict]:
        """A message and its alternatives (regenerations, edits), oldest first."""
        m = self.message(message_id)
        return self.children(m["conversation_id"], m["parent_id"])

    def newest_leaf(self, message_id: str) -> str:
        """The most recent message at the end of any branch below `message_id` (itself if none)."""
        row = next(iter(self.db.query(
            "WITH RECURSIVE below(id) AS (SELECT ? UNION ALL SELECT m.id FROM messages m JOIN below ON m.parent_id = "
            "below.id) SELECT messages.id FROM below JOIN messages ON messages.id = below.id WHERE NOT EXISTS "
            "(SELECT 1 FROM messages c WHERE c.parent_id = messages.id) ORDER BY created_at DESC, rowid DESC LIMIT 1",
            [message_id])))
        return row["id"]

    def set_current_leaf(self, conversation_id: str, message_id: str) -> None:
        if self.message(message_id)["conversation_id"] != conversation_id:
            raise ParleyError(f"message {message_id!r} belongs to another conversation")
        with self.transaction():
            self.conn.execute("UPDATE conversations SET current_leaf = ? WHERE id = ?", (message_id, conversation_id))

    def search(self, query: str, limit: int = 50) -> list[dict]:
        """Messages whose content holds every word of `query` (full-text search), best matches first."""
        words = query.split()
        if not words:
            return []
        # Each word is quoted, so the user's text is never read as FTS syntax.
        match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        rows = self.db.query(
            "SELECT messages.*, conversations.title AS conversation_title, "
            "snippet(messages_fts, 0, '[', ']', '…', 12) AS snippet FROM messages_fts "
            "JOIN messages ON messages.rowid = messages_fts.rowid "
            "JOIN conversations ON conversations.id = messages.conversation_id "
            "WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?", [match, limit])
        return [_decode(r) for r in rows]

    # -- comparisons, rankings and preference pairs -------------------------------------------------
    def create_comparison(self, conversation_id: str, parent_id: str | None, message_ids: list[str]) -> str:
        if len(message_ids) < 2 or len(set(message_ids)) != len(message_ids):
            raise ParleyError("a comparison needs two or more different candidates")
        for mid in message_ids:
            m = self.message(mid)
            if (m["conversation_id"], m["parent_id"], m["role"]) != (conversation_id, parent_id, "assistant"):
                raise ParleyError(f"message {mid!r} is not an assistant reply to the compared context")
        comparison_id = new_id()
        with self.transaction():
            self.db["comparisons"].insert({"id": comparison_id, "conversation_id": conversation_id,
                                           "parent_id": parent_id, "created_at": now()})
            self.db["comparison_candidates"].insert_all(
                {"comparison_id": comparison_id, "position": i, "message_id": mid} for i, mid in enumerate(message_ids))
        return comparison_id

    def discard_comparison(self, comparison_id: str) -> list[str]:
        """Delete an unranked comparison with its candidates and everything written below them;
        returns the deleted messages' ids. A ranked one (or one with a ranked comparison below it)
        is preference data and is refused. The conversation moves to the newest branch left."""
        comparison = self._one("SELECT * FROM comparisons WHERE id = ?", [comparison_id], "comparison")
        below = ("WITH RECURSIVE doomed(id) AS (SELECT message_id FROM comparison_candidates WHERE comparison_id = ? "
                 "UNION SELECT m.id FROM messages m JOIN doomed ON m.parent_id = doomed.id) ")
        with self.transaction():
            doomed = [r["id"] for r in self.db.query(below + "SELECT id FROM doomed", [comparison_id])]
            ranked = [r["comparison_id"] for r in self.db.query(
                below + "SELECT DISTINCT r.comparison_id FROM rankings r JOIN comparison_candidates c "
                "ON c.comparison_id = r.comparison_id WHERE c.message_id IN (SELECT id FROM doomed)", [comparison_id])]
            if ranked:
                where = "it has" if comparison_id in ranked else f"comparison {ranked[0]!r}, below its candidates, has"
                raise ParleyError(f"comparison {comparison_id!r} cannot be discarded: {where} a ranking or vote, "
                                  "which is preference data; only unranked comparisons are discarded")
            leaf = self.conversation(comparison["conversation_id"])["current_leaf"]
            self.conn.execute(f"DELETE FROM messages WHERE id IN ({', '.join('?' * len(doomed))})", doomed)
            self.conn.execute("DELETE FROM comparisons WHERE id = ?", [comparison_id])
            if leaf in doomed and comparison["parent_id"] is not None:
                self.set_current_leaf(comparison["conversation_id"], self.newest_leaf(comparison["parent_id"]))
        return doomed

    def comparison(self, comparison_id: str) -> dict:
        c = self._one("SELECT * FROM comparisons WHERE id = ?", [comparison_id], "comparison")
        c["candidates"] = [_decode(r) for r in self.db.query(
            "SELECT messages.* FROM comparison_candidates JOIN messages ON messages.id = message_id "
            "WHERE comparison_id = ? ORDER BY position", [comparison_id])]
        return c

    def rank(self, comparison_id: str, ranks: dict[str, int], annotator: str = "user", *,
             kind: str = "order", vote: str | None = None, created_at: str | None = None,
             ranking_id: str | None = None) -> str:
        """Record a full order with ties (1 = best; equal ranks tie) and derive its preference pairs.

        A ranking of K candidates without ties gives its C(K, 2) ordered pairs; tied candidates give
        no pair between them.
        """
        candidates = [m["id"] for m in self.comparison(comparison_id)["candidates"]]
        if sorted(ranks) != sorted(candidates):
            raise ParleyError("a ranking must give a rank to every candidate of the comparison, and only to them")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks.values()):
            raise ParleyError("ranks are whole numbers from 1 (best) up")
        rid = ranking_id or new_id()
        pairs = [{"ranking_id": rid, "chosen_id": a, "rejected_id": b}
                 for a, b in itertools.permutations(candidates, 2) if ranks[a] < ranks[b]]
        with self.transaction():
            self.db["rankings"].insert({"id": rid, "comparison_id": comparison_id, "kind": kind,
                                        "ranks": json.dumps(ranks), "vote": vote, "annotator": annotator,
                                        "created_at": created_at or now()})
            self.db["preference_pairs"].insert_all(pairs)
        return rid

    def vote(self, comparison_id: str, vote: str, best: str | None = None, worst: str | None = None,
             annotator: str = "user") -> str:
        """A quick judgement: `best` (with the best candidate, and optionally the worst), `tie`, or
        `both_bad` (no pair; every candidate is flagged)."""
        if vote not in VOTES:
            raise ParleyError(f"vote {vote!r} is not one of {', '.join(VOTES)}")
        candidates = [m["id"] for m in self.comparison(comparison_id)["candidates"]]
        if vote == "best":
            if best not in candidates or (worst is not None and (worst not in candidates or worst == best)):
                raise ParleyError("a 'best' vote names one candidate as best (and optionally another as worst)")
            if worst is None and len(candidates) == 2:
                worst = next(c for c in candidates if c != best)
            last = 3 if len(candidates) > 2 else 2
            ranks = {c: 1 if c == best else last if c == worst else 2 for c in candidates}
        else:
            ranks = dict.fromkeys(candidates, 1)
        with self.transaction():
            rid = self.rank(comparison_id, ranks, annotator, kind="vote", vote=vote)
            if vote == "both_bad":
                for c in candidates:
                    self.flag(c, "both_bad", rid)
        return rid

    def flag(self, message_id: str, flag: str, ranking_id: str | None = None) -> None:
        if flag not in FLAGS:
            raise ParleyError(f"flag {flag!r} is not one of {', '.join(FLAGS)}")
        with self.transaction():
            self.db["flags"].insert({"message_id": message_id, "flag": flag, "ranking_id": ranking_id,
                                     "created_at": now()}, ignore=True)

    def flags(self, message_id: str) -> list[str]:
        return [r["flag"] for r in self.db.query("SELECT flag FROM flags WHERE message_id = ? ORDER BY flag",
                                                 [message_id])]

    def save_scores(self, reward_model: str, scores: dict[str, float]) -> None:
        """Record a reward model's score of each reply (message id: score); a new score replaces the old."""
        stamp = now()
        with self.transaction():
            self.db["reward_scores"].insert_all(({"message_id": m, "reward_model": reward_model, "score": float(s),
                                                  "created_at": stamp} for m, s in scores.items()), replace=True)

    def scores(self, reward_model: str, message_ids: list[str]) -> dict[str, float]:
        """The recorded scores of these replies by `reward_model` (replies it has not scored are absent)."""
        marks = ", ".join("?" * len(message_ids))
        return {r["message_id"]: r["score"] for r in self.db.query(
            f"SELECT message_id, score FROM reward_scores WHERE reward_model = ? AND message_id IN ({marks})",
            [reward_model, *message_ids])} if message_ids else {}

    def rankings(self, comparison_id: str | None = None) -> list[dict]:
        where, params = ("WHERE comparison_id = ?", [comparison_id]) if comparison_id else ("", [])
        rows = list(self.db.query(f"SELECT * FROM rankings {where} ORDER BY created_at, rowid", params))
        for r in rows:
            r["ranks"] = json.loads(r["ranks"])
        return rows

    def preference_pairs(self) -> list[dict]:
        """Every pair with its prompt (the thread up to the compared context), oldest ranking first."""
        rows = list(self.db.query(
            "SELECT p.ranking_id, r.comparison_id, r.annotator, r.created_at, c.conversation_id, c.parent_id, "
            "ch.id AS chosen_id, ch.content AS chosen, ch.model AS chosen_model, "
            "rj.id AS rejected_id, rj.content AS rejected, rj.model AS rejected_model "
            "FROM preference_pairs p JOIN rankings r ON r.id = p.ranking_id "
            "JOIN comparisons c ON c.id = r.comparison_id "
            "JOIN messages ch ON ch.id = p.chosen_id JOIN messages rj ON rj.id = p.rejected_id "
            "ORDER BY r.created_at, r.rowid, p.rowid"))
        prompts = {}
        for row in rows:
            key = (row["conversation_id"], row["parent_id"])
            if key not in prompts:
                prompts[key] = self.prompt_messages(*key)
            row["prompt"] = prompts[key]
        return rows

    def pairs_by_prompt(self) -> list[dict]:
        """Preference pairs grouped by prompt (InstructGPT keeps one prompt's pairs in one batch element)."""
        groups: dict[tuple, dict] = {}
        for pair in self.preference_pairs():
            key = (pair["conversation_id"], pair["parent_id"])
            groups.setdefault(key, {"prompt": pair["prompt"], "pairs": []})["pairs"].append(pair)
        return list(groups.values())

    def rankings_by_prompt(self) -> list[dict]:
        """Rankings grouped by the context they rank replies to: {"prompt", "rankings": [ranking with
        its candidates' texts]}, oldest first."""
        groups: dict[tuple, dict] = {}
        for r in self.rankings():
            comparison = self.comparison(r["comparison_id"])
            key = (comparison["conversation_id"], comparison["parent_id"])
            if key not in groups:
                groups[key] = {"prompt": self.prompt_messages(*key), "rankings": []}
            r["candidates"] = [{"id": m["id"], "content": m["content"], "model": m["model"],
                                "rank": r["ranks"][m["id"]]} for m in comparison["candidates"]]
            groups[key]["rankings"].append(r)
        return list(groups.values())

    def prompt_messages(self, conversation_id: str, parent_id: str | None) -> list[dict]:
        """The context a reply answers, as chat messages: the system prompt, then the thread."""
        conversation = self.conversation(conversation_id)
        system = conversation["system_prompt"]
        messages = [{"role": "system", "content": system}] if system else []
        if parent_id is not None:
            messages += [{"role": m["role"], "content": m["content"]} for m in self.thread(conversation_id, parent_id)]
        return messages

    def latest_user_message(self, outside: set[str] | frozenset = frozenset()) -> dict | None:
        """The newest user message of a conversation not in `outside` (ids), or None."""
        row = next(iter(self.db.query(
            "SELECT * FROM messages WHERE role = 'user' AND conversation_id NOT IN (SELECT value FROM json_each(?)) "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1", [json.dumps(sorted(outside))])), None)
        return _decode(row) if row else None

    def counts(self) -> dict:
        tables = ("conversations", "messages", "comparisons", "rankings", "preference_pairs", "runs")
        return {t: self.db[t].count for t in tables}

    # -- training runs and metrics ------------------------------------------------------------------
    def start_run(self, kind: str, config: dict, base_model: str | None = None, pid: int | None = None) -> str:
        rid = new_id()
        with self.transaction():
            self.db["runs"].insert({"id": rid, "kind": kind, "config": json.dumps(config), "status": "running",
                                    "base_model": base_model, "started_at": now(), "pid": pid,
                                    "host": socket.gethostname()})
        return rid

    def resume_run(self, run_id: str, pid: int | None = None) -> None:
        """A run that continues from its checkpoint (after a crash, a cancel or an interruption) is
        running again."""
        self.run(run_id)
        with self.transaction():
            self.conn.execute("UPDATE runs SET status = 'running', error = NULL, finished_at = NULL, pid = ?, "
                              "host = ? WHERE id = ?", (pid, socket.gethostname(), run_id))

    def end_run(self, run_id: str, status: str, output_model: str | None = None, error: str | None = None) -> None:
        if status not in ("finished", "failed", "cancelled"):
            raise ParleyError(f"a run ends as finished, failed or cancelled, not {status!r}")
        with self.transaction():
            self.conn.execute("UPDATE runs SET status = ?, output_model = ?, error = ?, finished_at = ? WHERE id = ?",
                              (status, output_model, error, now(), run_id))

    def log_metrics(self, run_id: str, step: int, values: dict[str, float]) -> None:
        stamp = now()
        with self.transaction():
            # A resumed run logs its steps again; the newer value wins.
            self.db["metrics"].insert_all(({"run_id": run_id, "step": step, "name": name, "value": float(v),
                                            "recorded_at": stamp} for name, v in values.items()), replace=True)

    def run(self, run_id: str) -> dict:
        r = self._one("SELECT * FROM runs WHERE id = ?", [run_id], "run")
        r["config"] = json.loads(r["config"])
        return r

    def runs(self, kind: str | None = None) -> list[dict]:
        where, params = ("WHERE kind = ?", [kind]) if kind else ("", [])
        rows = list(self.db.query(f"SELECT * FROM runs {where} ORDER BY started_at DESC, rowid DESC", params))
        for r in rows:
            r["config"] = json.loads(r["config"])
        return rows

    def metrics(self, run_id: str, name: str | None = None) -> list[dict]:
        where, params = ("AND name = ?", [run_id, name]) if name else ("", [run_id])
        return list(self.db.query(f"SELECT step, name, value FROM metrics WHERE run_id = ? {where} "
                                  "ORDER BY step, name", params))


def _make_folder(folder: Path) -> None:
    """The database's folder, created if missing; a file in its place is refused, never replaced."""
    if folder.exists() and not folder.is_dir():
        raise ParleyError(f"{folder} is a file, not a folder: set PARLEY_HOME to a folder (Parley keeps "
                          "parley.db in it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ParleyError(f"cannot create the folder {folder}: part of its path is a file; set PARLEY_HOME "
                          "to a folder") from None
    except OSError as e:
        raise ParleyError(f"cannot create the folder {folder} ({e.strerror}): fix the permissions, or set "
                          "PARLEY_HOME to a folder you can write") from None


def store_error(path: Path, e: sqlite3.Error) -> ParleyError | None:
    """What SQLite's refusal means for the user, or None for one that is not about the file or the disk."""
    text = str(e).lower()
    if "locked" in text or "busy" in text:
        return ParleyError(f"{path} is locked by another process (waited {BUSY_TIMEOUT_S:g} s): close the other "
                           "Parley (app or trainer) using it, or wait for it to finish, and try again")
    if "full" in text:
        return ParleyError(f"{path}: database or disk is full: free space on its disk (or set PARLEY_HOME to "
                           "a folder on a disk with room) and try again; nothing was written")
    if "readonly" in text or "read-only" in text:
        return ParleyError(f"{path} cannot be written (it is read-only): fix its permissions (chmod u+w), or "
                           "set PARLEY_HOME to a folder you can write")
    if "unable to open" in text:
        if path.is_dir():
            return ParleyError(f"{path} is a folder, not a database: move it aside, or set PARLEY_HOME to "
                               "another folder")
        return ParleyError(f"{path} cannot be opened for writing (the file or its folder {path.parent} cannot "
                           "be written): fix the permissions, or set PARLEY_HOME to a folder you can write")
    return None


def _mark_interrupted(conn: sqlite3.Connection) -> None:
    """A run still 'running' whose process on this host is gone was killed before it could say how it
    ended: it is 'interrupted' (a run elsewhere, or without a pid, cannot be judged from here)."""
    here = socket.gethostname()
    gone = [(r[0],) for r in conn.execute("SELECT id, pid FROM runs WHERE status = 'running' AND pid IS NOT NULL "
                                         "AND (host IS NULL OR host = ?)", (here,)) if not _alive(r[1])]
    if gone:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("UPDATE runs SET status = 'interrupted', finished_at = ? WHERE id = ? "
                             "AND status = 'running'", [(now(), rid) for (rid,) in gone])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL. On a new database another process may be switching it at the same moment,
    and SQLite then answers "locked" at once rather than wait: try again for a while."""
    for attempt in range(200):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 199:
                raise
            time.sleep(0.05)


def _json(value) -> str | None:
    return None if value is None else json.dumps(value)


def _round(value: float | None) -> float | None:
    """Four significant digits: what the inspector shows, at a third of the size of a float's 17.
    JSON has no infinity: a token the processors removed has no probability to keep (None)."""
    return None if value is None or not math.isfinite(value) else float(f"{value:.4g}")


def _token_row(token: dict, step: int) -> list:
    if "token_id" not in token:
        raise ParleyError(f"token {step} of the reply has no token_id: give each token its id")
    alternatives = [[[a["token_id"], a.get("piece", ""), _round(a.get("prob"))] for a in token.get(side) or []]
                    for side in ("before", "after")]
    return [token["token_id"], token.get("piece", ""), token.get("text", ""), _round(token.get("logprob")),
            _round(token.get("sampled_logprob")), *alternatives]


def _token_dict(step: int, row: list) -> dict:
    token_id, piece, text, logprob, sampled_logprob, before, after = row
    return {"step": step, "token_id": token_id, "piece": piece, "text": text, "logprob": logprob,
            "sampled_logprob": sampled_logprob,
            "before": [{"token_id": t, "piece": p, "prob": prob} for t, p, prob in before],
            "after": [{"token_id": t, "piece": p, "prob": prob} for t, p, prob in after]}


def _decode(row: dict) -> dict:
    for key in ("settings", "timings", "segments"):
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row
