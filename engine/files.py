"""Atomic writes: a file or directory is either wholly the old one or wholly the new one.

Output directories (`--out`, `lm.save`) are shared with the person who owns them: Parley writes
into a directory only if it is new, empty or one Parley made (it holds MARKER, which lists the
files Parley wrote there), and it replaces or removes only the files it listed. Anything else in
it (a corpus, notes, a subfolder) is never touched.
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from engine.errors import ParleyError

MARKER = ".parley-output"


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory beside `path`; on success it replaces `path` by renames. Only for
    directories that are wholly Parley's (a checkpoint); outputs go through `output_dir`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(path: str | Path) -> Path:
    """Refuse, before any work, an output `path` that Parley may not write into."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ParleyError(f"output {path} is a file, not a directory: pass --out a new or empty directory")
    if path.is_dir() and not (path / MARKER).is_file():
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ParleyError(f"output directory {path} already holds files Parley did not write ({shown}), "
                              "which it would not touch: pass --out a new or empty directory")
    return path


def claim_output_dir(path: str | Path) -> Path:
    """Make `path` an output directory of Parley's (see `check_output_dir`), at the first write into it."""
    path = check_output_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        _write_marker(path, [])
    return path


@contextlib.contextmanager
def output_dir(path: str | Path):
    """Yield an empty temporary directory inside output directory `path`; on success each file
    written there replaces its namesake in `path` by a rename (config.json last, so `path` loads
    as a model only once it is whole), and the files Parley wrote there before and not this time go."""
    path = claim_output_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path))
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(path, tmp)
    except (OSError, SafetensorError) as e:   # a full disk, most often; `path` keeps its old files
        raise ParleyError(f"could not write {path} ({e}): free some space or pass another directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(out: Path, source: Path) -> None:
    """Rename the files of `source` into output directory `out`, the file that makes it a model last
    (config.json, or an adapter's adapter_config.json): a crash midway leaves no new config beside old weights."""
    last = ("config.json", "adapter_config.json")
    files = sorted((p for p in source.iterdir() if p.is_file()), key=lambda p: (p.name in last, p.name))
    before = _marker_files(out)
    _write_marker(out, sorted(set(before) | {f.name for f in files}))   # listed first: a crash leaves none unlisted
    for f in files:
        os.replace(f, out / f.name)
    for stale in set(before) - {f.name for f in files}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / stale)
    _write_marker(out, sorted(f.name for f in files))
    _fsync(out)


def _marker_files(out: Path) -> list[str]:
    try:
        files = json.loads((out / MARKER).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    # only plain names: a marker edited to say "../x" must not make Parley remove files elsewhere
    return [f for f in files if isinstance(f, str) and f and Path(f).name == f and f not in (".", "..", MARKER)]


def _write_marker(out: Path, files: list[str]) -> None:
    atomic_write_text(out / MARKER, json.dumps({"written_by": "parley", "files": files}) + "\n")


def check_output_file(out: Path, example: str) -> Path:
    """A file to write or replace (`parley export`, `parley export-model`): never a folder (its
    temporary file would land beside it), never under a folder that does not exist (a typo there is
    not a folder to create). `example` names a file the error suggests writing inside a folder."""
    if out.is_dir():
        raise ParleyError(f"{out} is a folder: give the path of the file to write, e.g. {out / example}")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise ParleyError(f"cannot write {out}: the folder {out.parent} {what}; create it first or write "
                          "somewhere else")
    return out


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            _fsync(p)
    _fsync(root)
