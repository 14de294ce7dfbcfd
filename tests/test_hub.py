"""Hugging Face models by name (engine/hub.py, engine/registry.py, `parley pull`), with no network.

Each test builds a Hugging Face cache on disk in the library's own layout (models--org--name/ with
blobs/, snapshots/<commit>/ of symlinks into blobs/, refs/<branch or tag>), points the library at it
and turns it offline; a guard on socket.connect fails any test in which something tries the network.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from bad_input import assert_one_line_error, files_under, run_cli, unchanged

MAIN, OLD = "a" * 40, "b" * 40    # commit hashes


def put_in_cache(cache: Path, repo_id: str, source: Path, commit: str, refs=("main",), skip=()) -> Path:
    """Add `source`'s files to the cache as `repo_id` at `commit`, the way huggingface_hub stores a download."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        if f.name in skip:
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache under a tmp HF_HOME, offline, a Parley home, and no network at all."""
    from huggingface_hub import constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the library reads those once, at import: set what it read, as a fresh process would have
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried the network: {args}")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)   # a host name is looked up before any connect
    return cache


@pytest.fixture
def tiny(hub, checkpoints):
    """org/tiny in the cache: commit MAIN on main, commit OLD on branch old and tag v1."""
    source, _ = checkpoints("gpt2")
    return (put_in_cache(hub, "org/tiny", source, MAIN),
            put_in_cache(hub, "org/tiny", source, OLD, refs=("old", "v1")))


def test_socket_guard_is_on(hub):
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("huggingface.co", 443), timeout=1)


def test_generate_from_the_cache(tiny, tmp_path, monkeypatch):
    run = run_cli("generate", "--model", "org/tiny", "--prompt", "hi", "--max-new-tokens", "3", "--seed", "1",
                  "--device", "cpu", "--json", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert run.rc == 0, run.err
    assert '"finish_reason"' in run.out


def test_revision_by_commit_and_by_ref(tiny):
    from engine.registry import resolve_model
    main, old = (p.resolve() for p in tiny)
    assert resolve_model("org/tiny").resolve() == main
    assert resolve_model("org/tiny@main").resolve() == main
    assert resolve_model(f"org/tiny@{OLD}").resolve() == old
    assert resolve_model("org/tiny@old").resolve() == old
    assert resolve_model("org/tiny@v1").resolve() == old


def test_hf_home_and_hf_hub_cache_are_respected(tiny, tmp_path):
    """In a fresh process the library reads the environment itself: HF_HOME/hub, and HF_HUB_CACHE over it."""
    code = "from engine.registry import resolve_model; print(resolve_model('org/tiny'))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert Path(out.stdout.strip()).resolve() == tiny[0].resolve(), out.stderr
    moved = tmp_path / "elsewhere"
    (tmp_path / "hf" / "hub").rename(moved)
    env["HF_HUB_CACHE"] = str(moved)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert Path(out.stdout.strip()) == moved.resolve() / "models--org--tiny" / "snapshots" / MAIN, out.stderr


def test_a_path_and_a_known_name_keep_priority(hub, tiny, tmp_path, monkeypatch, checkpoints):
    from engine.registry import resolve_model
    from engine.store import Store
    source, _ = checkpoints("gpt2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").symlink_to(source)   # a relative directory named like the repo
    assert resolve_model("org/tiny") == Path("org/tiny")
    with Store() as store:
        store.add_model("org/other", source, kind="hf")
    put_in_cache(hub, "org/other", source, MAIN)
    assert resolve_model("org/other") == source


@pytest.mark.parametrize("name, words", [
    ("org/absent", ["org/absent", "neither a model directory nor in the hugging face cache", "parley pull org/absent", "hf download"]),
    ("org/tiny@nope", ["org/tiny", "no revision 'nope'", "main", "old", "parley pull org/tiny@nope",
                       "hf download org/tiny --revision nope"]),
    (f"org/tiny@{'c' * 40}", ["org/tiny", "c" * 40, "parley pull"]),
    ("org/bad name", ["'org/bad name'", "not a valid hugging face repo id"]),
    ("org/a--b", ["'org/a--b'", "not a valid hugging face repo id"]),
    ("gpt2@main", ["'gpt2@main'", "org/name"]),
    ("org/tiny@", ["empty revision"]),
])
def test_a_model_not_in_the_cache_is_one_line_of_advice(hub, tiny, tmp_path, monkeypatch, name, words):
    with unchanged(tmp_path / "home", hub):
        run = run_cli("generate", "--model", name, "--prompt", "hi", "--device", "cpu",
                      home=tmp_path / "home", monkeypatch=monkeypatch)
    assert_one_line_error(run, *words)


def test_a_snapshot_without_config_is_named(hub, checkpoints, tmp_path, monkeypatch):
    source, _ = checkpoints("gpt2")
    put_in_cache(hub, "org/partial", source, MAIN, skip=("config.json",))
    run = run_cli("generate", "--model", "org/partial", "--prompt", "hi", home=tmp_path / "home",
                  monkeypatch=monkeypatch)
    assert_one_line_error(run, "org/partial", "no config.json", "parley pull org/partial")


def test_an_interrupted_download_is_named(hub, checkpoints, tmp_path, monkeypatch):
    """The library keeps the commit's file list (trees/<commit>.json) and so tells a partial snapshot."""
    from huggingface_hub import errors
    if not hasattr(errors, "IncompleteSnapshotError"):
        pytest.skip("this huggingface_hub does not tell partial snapshots")
    source, _ = checkpoints("gpt2")
    snapshot = put_in_cache(hub, "org/half", source, MAIN, skip=("model.safetensors",))
    files = {f.name: {"size": f.stat().st_size, "blob_id": "0" * 40} for f in source.iterdir()}
    (snapshot.parent.parent / "trees").mkdir()
    (snapshot.parent.parent / "trees" / f"{MAIN}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    run = run_cli("generate", "--model", "org/half", "--prompt", "hi", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert_one_line_error(run, "org/half", "incomplete", "parley pull org/half")
    run = run_cli("pull", "org/half", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert_one_line_error(run, "org/half", "incomplete", "HF_HUB_OFFLINE", "parley pull org/half")


def test_pull_offline_of_a_missing_model_is_one_line(hub, tmp_path, monkeypatch):
    with unchanged(tmp_path / "home", hub):
        run = run_cli("pull", "org/absent", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert_one_line_error(run, "org/absent", "offline mode is on", "HF_HUB_OFFLINE", "parley pull org/absent")
    assert not (tmp_path / "home" / "parley.db").exists()


def test_pull_of_a_cached_model_loads_and_registers_it(hub, tiny, tmp_path, monkeypatch, checkpoints):
    from engine.registry import known_models
    from engine.store import Store
    home = tmp_path / "home"
    run = run_cli("pull", "org/tiny", home=home, monkeypatch=monkeypatch)
    assert run.rc == 0, run.err
    assert "added to the app's models" in run.err
    with Store() as store:
        row = store.model("org/tiny")
    assert row["kind"] == "hub" and Path(row["path"]) == tiny[0].resolve()
    assert known_models()["org/tiny"].resolve() == tiny[0].resolve()   # what the app's model list shows
    again = run_cli("pull", "org/tiny", home=home, monkeypatch=monkeypatch)
    assert again.rc == 0 and "added" not in again.err, again.err
    with Store() as store:
        assert [m["name"] for m in store.models()].count("org/tiny") == 1
    # a newer download of main (here by hand, as `hf download` would) is the one the name means now
    source, _ = checkpoints("gpt2")
    newer = put_in_cache(hub, "org/tiny", source, "d" * 40)
    assert known_models()["org/tiny"].resolve() == newer.resolve()


def test_pull_refuses_a_model_that_does_not_load(hub, checkpoints, tmp_path, monkeypatch):
    """The load check runs before the model is registered: a broken one never shows in the app."""
    source, _ = checkpoints("gpt2")
    snapshot = put_in_cache(hub, "org/broken", source, MAIN)
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").write_text('{"model_type": "gpt2", "n_embd": 32}')   # shapes no longer match
    run = run_cli("pull", "org/broken", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert_one_line_error(run, "org/broken", "does not load", "vocab_size")
    from engine.store import Store
    with Store() as store:
        assert store.model("org/broken") is None


def test_pull_refuses_pickled_weights_only(hub, checkpoints, tmp_path, monkeypatch):
    source, _ = checkpoints("gpt2")
    snapshot = put_in_cache(hub, "org/pickled", source, MAIN, skip=("model.safetensors",))
    (snapshot / "pytorch_model.bin").write_bytes(b"pickle")
    before = files_under(hub)
    run = run_cli("pull", "org/pickled", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert_one_line_error(run, "org/pickled", "no safetensors")
    assert files_under(hub) == before and (snapshot / "config.json").exists()


def test_only_the_files_parley_reads_are_downloaded():
    """The allow and ignore patterns, through the library's own filter (the one snapshot_download uses)."""
    from huggingface_hub.utils import filter_repo_objects

    from engine.hub import IGNORE, PATTERNS
    wanted = ["config.json", "generation_config.json", "model.safetensors", "model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]
    never = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
             "model.pt", "consolidated.00.pth", "model.ckpt", "tf_model.h5", "flax_model.msgpack", "model.onnx",
             "model-q4.gguf", "original/consolidated.00.pth", "original/params.json", "onnx/model.safetensors",
             "onnx/model.onnx", "README.md", ".gitattributes", "vocab.json", "merges.txt", "tokenizer.model"]
    kept = list(filter_repo_objects(wanted + never, allow_patterns=PATTERNS, ignore_patterns=IGNORE))
    assert kept == wanted
