"""The store's schema, as ordered migrations. `PRAGMA user_version` is the number applied.

A migration is SQL, or a function of a sqlite-utils Database where the library builds the schema.
It is only ever appended, never edited: a database written by any earlier Parley opens by running
the migrations it lacks, in order, each in its own transaction.
"""
import sqlite3

from sqlite_utils import Database

V1 = """
CREATE TABLE models (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'hf',
    added_at TEXT NOT NULL,
    notes TEXT NOT NULL DEFAULT ''
);
CREATE TABLE preferences (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    model TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    archived INTEGER NOT NULL DEFAULT 0,
    current_leaf TEXT REFERENCES messages(id) ON DELETE SET NULL
);
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    model TEXT,
    settings TEXT,              -- JSON: the full decoding settings, seed included
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    timings TEXT,               -- JSON
    finish_reason TEXT,         -- eos, stop, length, cancelled; NULL while generating
    status TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'partial')),
    created_at TEXT NOT NULL
);
CREATE INDEX messages_by_conversation ON messages(conversation_id, created_at);
CREATE INDEX messages_by_parent ON messages(parent_id);
CREATE TABLE comparisons (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);
CREATE TABLE comparison_candidates (
    comparison_id TEXT NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    PRIMARY KEY (comparison_id, position)
);
CREATE TABLE rankings (
    id TEXT PRIMARY KEY,
    comparison_id TEXT NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('order', 'vote')),
    ranks TEXT NOT NULL,        -- JSON {message_id: rank}, 1 = best, equal ranks = tie
    vote TEXT,                  -- for kind 'vote': best, worst, tie or both_bad
    annotator TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE preference_pairs (
    ranking_id TEXT NOT NULL REFERENCES rankings(id) ON DELETE CASCADE,
    chosen_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    rejected_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    PRIMARY KEY (ranking_id, chosen_id, rejected_id)
);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,       -- JSON
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed', 'cancelled')),
    base_model TEXT,
    output_model TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    error TEXT,
    pid INTEGER
);
CREATE TABLE metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (run_id, step, name)
);
"""

# Version 2: full-text search over messages (kept in step by triggers; version 3 replaces both) and
# candidate flags.
V2 = """
CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='rowid');
INSERT INTO messages_fts(rowid, content) SELECT rowid, content FROM messages;
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content);
END;
CREATE TABLE flags (
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    flag TEXT NOT NULL CHECK (flag IN ('fails_instruction', 'made_up_facts', 'unsafe', 'both_bad')),
    ranking_id TEXT REFERENCES rankings(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    PRIMARY KEY (message_id, flag)
);
"""


def v3_search_index_by_sqlite_utils(db: Database) -> None:
    """Version 3: the full-text index over messages and the triggers that keep it in step are
    sqlite-utils' (messages_ai, messages_ad, messages_au) instead of version 2's hand-written ones.
    The index is built again from the messages, so every message written before stays searchable."""
    for trigger in ("messages_fts_insert", "messages_fts_delete", "messages_fts_update"):
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    db["messages_fts"].drop(ignore=True)
    db["messages"].enable_fts(["content"], create_triggers=True)


# Version 4: every reply keeps its tokens (what the token inspector shows, what a continuation from
# an alternative token starts from), and the settings of a reply changed while it was generated.
V4 = """
CREATE TABLE reply_tokens (
    message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    forced INTEGER NOT NULL DEFAULT 0,   -- the first `forced` tokens were taken from another reply, not generated
    tokens TEXT NOT NULL                 -- compact JSON, one array per token: [token_id, piece, text, logprob,
                                         -- sampled_logprob, [[id, piece, prob], ...] before, [...] after]
);
-- JSON [{"from": token index, "settings": {...}}, ...]: the settings in force from each token on
ALTER TABLE messages ADD COLUMN segments TEXT;
"""

# Version 5: a run whose process died without saying how it ended (killed, the machine went down) is
# 'interrupted' (marked when the store next opens; resuming it runs it again), and a run keeps the
# host it runs on, so that only this host's processes are judged gone. SQLite cannot change a CHECK
# constraint in place: the table is built again and its rows copied (migrate() turns foreign keys
# off meanwhile, so dropping the old table does not cascade into metrics).
V5 = """
CREATE TABLE runs_v5 (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,       -- JSON
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed', 'cancelled', 'interrupted')),
    base_model TEXT,
    output_model TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    error TEXT,
    pid INTEGER,
    host TEXT                   -- the machine `pid` runs on; NULL for runs written before version 5
);
INSERT INTO runs_v5 (id, kind, config, status, base_model, output_model, started_at, finished_at, error, pid)
    SELECT id, kind, config, status, base_model, output_model, started_at, finished_at, error, pid FROM runs;
DROP TABLE runs;
ALTER TABLE runs_v5 RENAME TO runs;
"""

# Version 6: a reward model's score of a reply (the compare panes', best-of-N's), by the reward
# model's directory, so a reply scored once shows its score again without loading the model.
V6 = """
CREATE TABLE reward_scores (
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    reward_model TEXT NOT NULL,
    score REAL NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (message_id, reward_model)
);
"""

# Version 7: lineage, so that rounds of rank -> train -> rank the new model can be told apart (InstructGPT's
# iterations). A model trained here keeps the model it was trained from and its run; a reply keeps the
# run that trained the model which wrote it (NULL: a model not trained here, or a reply from before).
V7 = """
ALTER TABLE models ADD COLUMN parent TEXT;   -- the model it was trained from, as the run named it
ALTER TABLE models ADD COLUMN run_id TEXT REFERENCES runs(id) ON DELETE SET NULL;
ALTER TABLE messages ADD COLUMN run_id TEXT REFERENCES runs(id) ON DELETE SET NULL;
"""

MIGRATIONS = [V1, V2, v3_search_index_by_sqlite_utils, V4, V5, V6, V7]
LATEST = len(MIGRATIONS)


def version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection, upto: int = LATEST) -> None:
    """Apply the missing migrations up to `upto`, each atomically (the connection is in autocommit).
    The version is read again under the write lock: processes that open a new database at the same
    moment (torchrun's) apply each migration once."""
    db = Database(conn)
    foreign_keys = conn.execute("PRAGMA foreign_keys").fetchone()[0]
    conn.execute("PRAGMA foreign_keys = OFF")   # a table built again must not cascade (version 5)
    try:
        for number in range(version(conn) + 1, upto + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                if version(conn) < number:
                    _apply(MIGRATIONS[number - 1], db)
                    conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:   # SQLite may have rolled back already (a full disk)
                    conn.execute("ROLLBACK")
                raise
    finally:
        conn.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")


def _apply(migration, db: Database) -> None:
    if callable(migration):
        migration(db)  # sqlite-utils 4 runs its statements inside the open transaction
        return
    for statement in _statements(migration):
        db.conn.execute(statement)


def _statements(script: str) -> list[str]:
    # executescript() would commit on its own; split into complete statements instead.
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [s for s in statements if s]
