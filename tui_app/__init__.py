"""Parley's terminal app: screens and widgets over the engine's API (never torch directly)."""
