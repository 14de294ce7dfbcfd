"""Models by name from the Hugging Face Hub: `org/name` or `org/name@revision` (a branch, a tag or a
commit hash), with the huggingface_hub library.

- `cached(name)` finds a model in the local Hugging Face cache (HF_HOME, HF_HUB_CACHE), never over
  the network: every command that takes --model resolves names this way (engine/registry.py).
- `pull(name)` downloads the files Parley reads (PATTERNS; never pickled weights) into that cache,
  with the library's progress bars and resume, or takes them from the cache when offline.

The cache is the library's own layout (models--org--name/{refs,snapshots,blobs}); Parley only ever
asks the library to read or fill it, so a model fetched by `hf download` works too.
"""
from pathlib import Path

from engine.errors import ParleyError

# What engine.load reads from a model directory, and nothing else: weights only as safetensors, so
# pickled checkpoints (.bin, .pt, .pth, .ckpt), TF/Flax (.h5, .msgpack), ONNX and GGUF are never fetched.
PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "chat_template.json"]
# engine.load reads the top folder only: repos often keep other formats in subfolders (original/, onnx/).
IGNORE = ["*/*"]



def fetch_advice(name: str) -> str:
    repo_id, _, revision = name.partition("@")
    return f"fetch it with `parley pull {name}` (or `hf download {repo_id}" + \
        (f" --revision {revision}`)" if revision else "`)")


def is_hub_name(name: str) -> bool:
    """Whether `name` reads as org/name[@revision] rather than as a path (parse says if it is a valid one)."""
    return not name.startswith(("/", ".", "~")) and ("@" in name or name.count("/") == 1)


def parse(name: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of org/name[@revision], or one line saying what is wrong with it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    repo_id, at, revision = name.partition("@")
    if repo_id.count("/") != 1:
        raise ParleyError(f"{name!r} is not a Hugging Face model name: write org/name or org/name@revision")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ParleyError(f"{repo_id!r} is not a valid Hugging Face repo id: org and name use letters, digits, "
                          "'-', '_' and '.' (not '--' or '..'), at most 96 characters") from None
    if at and not revision.strip():
        raise ParleyError(f"{name!r} has an empty revision after '@': write org/name@BRANCH, TAG or COMMIT, "
                          "or leave out the '@'")
    return repo_id, revision or None


def cache_dir() -> Path:
    """The Hugging Face cache the library uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)   # read at call time: the library sets it from the environment


def cached(name: str) -> Path:
    """The snapshot directory of org/name[@revision] in the local cache, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    repo_id, revision = parse(name)
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=True,
                                      allow_patterns=PATTERNS, ignore_patterns=IGNORE))
    except LocalEntryNotFoundError as e:
        if _incomplete(e):
            raise ParleyError(f"the cached copy of {name} is incomplete: finish it with `parley pull {name}`") from None
        raise ParleyError(_not_cached(repo_id, revision, name)) from None
    if not (path / "config.json").is_file():
        raise ParleyError(f"the cached copy of {name} ({path}) has no config.json: {fetch_advice(name)}")
    return path


def _incomplete(error: Exception) -> bool:
    """Whether the library found a partial download (huggingface_hub 1.x+ tells; older ones return it as is)."""
    from huggingface_hub import errors
    return isinstance(error, getattr(errors, "IncompleteSnapshotError", ()))


def _not_cached(repo_id: str, revision: str | None, name: str) -> str:
    """Why the cache has no snapshot: the repo is not there at all, or not at this revision."""
    from huggingface_hub.file_download import repo_folder_name
    repo = cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")
    refs = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file()) \
        if (repo / "refs").is_dir() else []
    commits = sorted(p.name[:12] for p in (repo / "snapshots").iterdir()) if (repo / "snapshots").is_dir() else []
    if not refs and not commits:
        return (f"{repo_id} is neither a model directory nor in the Hugging Face cache ({cache_dir()}): "
                f"{fetch_advice(name)}")
    have = ", ".join(refs + commits)
    return (f"{repo_id} has no revision {revision or 'main'!r} in the Hugging Face cache (it has {have}): "
            f"{fetch_advice(name)}")


def pull(name: str) -> Path:
    """Download org/name[@revision] into the cache (only PATTERNS) and return its snapshot directory.
    Offline (HF_HUB_OFFLINE=1) it takes what the cache has; an interrupted download resumes."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors
    repo_id, revision = parse(name)
    offline = constants.HF_HUB_OFFLINE
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=offline,
                                      allow_patterns=PATTERNS, ignore_patterns=IGNORE))
    except errors.LocalEntryNotFoundError as e:
        if _incomplete(e):
            raise ParleyError(f"the cached copy of {name} is incomplete and the Hub cannot be reached: connect "
                              f"(and unset HF_HUB_OFFLINE) and rerun `parley pull {name}`") from None
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hugging Face Hub cannot be reached"
        raise ParleyError(f"{name} is not in the Hugging Face cache and {why}: connect (and unset HF_HUB_OFFLINE) "
                          f"and rerun `parley pull {name}`") from None
    except errors.GatedRepoError:
        raise ParleyError(f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, log in with "
                          "`hf auth login`, then rerun") from None
    except errors.RepositoryNotFoundError:
        raise ParleyError(f"no model {repo_id} on the Hugging Face Hub (or it is private: log in with "
                          "`hf auth login`): check the name") from None
    except errors.RevisionNotFoundError:
        raise ParleyError(f"{repo_id} has no revision {revision!r} on the Hub: pass a branch, tag or commit "
                          "it has") from None
    except errors.HfHubHTTPError as e:
        raise ParleyError(f"the Hugging Face Hub refused {name}: {str(e).splitlines()[0]}") from None
    except OSError as e:   # a full disk, a cache folder we may not write: the library resumes on the next pull
        raise ParleyError(f"downloading {name} stopped: {e.strerror or e}: fix that and rerun "
                          f"`parley pull {name}` (it resumes)") from None
    if not (path / "config.json").is_file():
        raise ParleyError(f"{repo_id} has no config.json: it is not a transformers model Parley can load")
    if not any(path.glob("*.safetensors")):
        raise ParleyError(f"{repo_id} has no safetensors weights (Parley never loads pickled .bin/.pt files): "
                          "pick a repo that has model.safetensors")
    return path
