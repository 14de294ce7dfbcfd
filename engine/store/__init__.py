"""The store: everything a user said, every candidate and ranking, and training runs, in SQLite."""
from engine.store.store import Store

__all__ = ["Store"]
