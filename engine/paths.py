"""Where Parley keeps its data (the store's database) and its config.

`PARLEY_HOME` moves both under one directory; otherwise they follow the platform's
conventions (platformdirs), e.g. ~/.local/share/parley and ~/.config/parley on Linux.
"""
import os
from pathlib import Path

import platformdirs


def data_dir() -> Path:
    home = os.environ.get("PARLEY_HOME")
    return Path(home).expanduser() if home else Path(platformdirs.user_data_dir("parley", appauthor=False))


def config_dir() -> Path:
    home = os.environ.get("PARLEY_HOME")
    return Path(home).expanduser() if home else Path(platformdirs.user_config_dir("parley", appauthor=False))


def database_path() -> Path:
    return data_dir() / "parley.db"
