"""Dependency floors: each floor in pyproject.toml is at least the first release that has what
Parley calls, the installed version is inside the declared range, and those calls exist here.

FIRST_WITH names, for every declared dependency, the release that first has all the APIs Parley
relies on (read in each project's changelog or tagged source) and what they are; `uses` calls
them. A floor lowered below that release, an API missing from the installed version, or a new
dependency declared without its entry fails here, naming the package.
"""
import sqlite3
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
DECLARED = {Requirement(r).name.lower(): Requirement(r) for r in
            PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]}


def uses_torch():
    import torch
    import torch.nn.functional as F
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)  # engine/models/attention.py
    F.rms_norm(q, q.shape[-1:], eps=1e-6)                                        # engine/models/llama.py
    torch.autocast("cpu", dtype=torch.bfloat16)
    assert hasattr(torch.distributed, "all_gather_object")
    from torch.nn.parallel import DistributedDataParallel
    assert hasattr(DistributedDataParallel, "no_sync")


def uses_tokenizers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.decoders import DecodeStream
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a 海"], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    stream = DecodeStream(skip_special_tokens=True)  # by keyword: 0.22 put `ids` first
    assert "".join(stream.step(tok, i) or "" for i in tok.encode("a 海").ids) == "a 海"


def uses_safetensors(tmp_path):
    import numpy as np
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file as load_numpy
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import load_file, save_file
    save_file({"w": torch.ones(2)}, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    with safe_open(tmp_path / "t.safetensors", framework="pt", device="cpu") as f:
        assert list(f.keys()) == ["w"] and f.get_tensor("w").sum() == 2
    assert load_file(tmp_path / "t.safetensors")["w"].shape == (2,)
    save_numpy({"a": np.arange(3)}, str(tmp_path / "n.safetensors"))
    assert load_numpy(str(tmp_path / "n.safetensors"))["a"].tolist() == [0, 1, 2]
    assert issubclass(SafetensorError, Exception)


def uses_jinja2():
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    assert env.from_string("{% for x in [1, 2] %}{% break %}{% endfor %}ok").render() == "ok"
    assert issubclass(SecurityError, TemplateError)
    # 3.1.6: |attr goes through the sandbox, so an untrusted chat template cannot reach the raw
    # str.format, and through it Python's builtins (GHSA-cpwx-vrp4-4pq7, jinja's own test of the fix).
    with pytest.raises(SecurityError):
        env.from_string('{{ "{0.__call__.__builtins__[__import__]}" | attr("format")(not_here) }}').render()


def uses_textual():
    from textual.app import App
    from textual.widgets import Input, Markdown, Select, Sparkline, TextArea
    assert App and Input and Markdown and Select and Sparkline and TextArea


def uses_rich():
    import io

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    out = io.StringIO()
    console = Console(file=out, highlight=False)
    assert not console.is_terminal
    console.print("[b]step 1/2[/b]", markup=False, soft_wrap=True)
    assert out.getvalue() == "[b]step 1/2[/b]\n"
    progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[figures]}"), console=console, transient=True)
    progress.update(progress.add_task("train", total=2, completed=0, figures=""), completed=1, figures="loss 1")


def uses_platformdirs():
    import platformdirs
    assert platformdirs.user_data_dir("parley") and platformdirs.user_config_dir("parley")


def uses_sqlite_utils():
    from sqlite_utils import Database
    conn = sqlite3.connect(":memory:", isolation_level=None)
    db = Database(conn)
    db.execute("CREATE TABLE messages (id TEXT PRIMARY KEY, content TEXT)")
    conn.execute("BEGIN IMMEDIATE")
    with db.atomic():  # nested: a savepoint of the open transaction (engine/store/store.py)
        db["messages"].insert({"id": "a", "content": "hello sea"})
        db["messages"].insert({"id": "a", "content": "ignored"}, ignore=True)
        db["messages"].insert_all([{"id": "b", "content": "x"}, {"id": "b", "content": "the sea"}], replace=True)
    # The schema migration builds the search index inside its transaction: enable_fts must not commit it.
    db["messages"].enable_fts(["content"], create_triggers=True)
    assert conn.in_transaction, "enable_fts committed the open transaction"
    conn.execute("COMMIT")
    hits = db.query("SELECT messages.id FROM messages_fts JOIN messages ON messages.rowid = messages_fts.rowid "
                    "WHERE messages_fts MATCH 'sea' ORDER BY messages.id")
    assert [r["id"] for r in hits] == ["a", "b"]
    db["nothing"].drop(ignore=True)


def uses_numpy():
    import numpy as np
    assert np.searchsorted(np.array([1, 3]), 2) == 1 and np.bincount([0, 2], minlength=4).tolist() == [1, 0, 1, 0]


def uses_chitchat_dataset():
    import chitchat_dataset
    assert hasattr(chitchat_dataset, "Dataset")


def uses_pytest():
    assert hasattr(pytest, "MonkeyPatch")


def uses_transformers():
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PreTrainedTokenizerFast,
    )
    from transformers.generation import logits_process
    assert AutoConfig.for_model("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16})
    assert AutoModelForCausalLM and AutoModelForSequenceClassification and AutoTokenizer and PreTrainedTokenizerFast
    assert hasattr(logits_process, "TypicalLogitsWarper") and hasattr(logits_process, "MinPLogitsWarper")


def uses_peft():
    from peft import LoraConfig, PeftModel
    assert hasattr(PeftModel, "from_pretrained") and "use_rslora" in LoraConfig.__dataclass_fields__


def uses_huggingface_hub():
    import inspect

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError  # noqa: F401
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import validate_repo_id
    assert {"local_files_only", "allow_patterns", "ignore_patterns"} <= set(inspect.signature(snapshot_download).parameters)
    assert repo_folder_name(repo_id="a/b", repo_type="model") == "models--a--b" and constants.HF_HUB_CACHE
    validate_repo_id("org/name")


def uses_hypothesis():
    from hypothesis import HealthCheck, given, settings, strategies  # noqa: F401
    assert hasattr(HealthCheck, "too_slow") and hasattr(strategies, "recursive")


def uses_pytest_textual_snapshot():
    import pytest_textual_snapshot  # noqa: F401  (the snap_compare fixture)


def uses_gguf():
    import tempfile

    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
    writer.add_tensor("x", gguf.quants.quantize(np.ones((2, 4), np.float32), gguf.GGMLQuantizationType.BF16),
                      raw_dtype=gguf.GGMLQuantizationType.BF16)
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 1).get_name(
        "model.layers.0.self_attn.q_norm.weight", try_suffixes=(".weight",)) == "blk.0.attn_q_norm.weight"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text('{"model": {"merges": [["a", "b"]]}}')
        assert gguf.SpecialVocab(tmp, load_merges=True, n_vocab=2).merges == ["a b"] and hasattr(gguf, "GGUFReader")


def uses_starlette():
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import StreamingResponse
    from starlette.routing import Route
    assert hasattr(StreamingResponse, "listen_for_disconnect") and HTTPException and Route and Starlette


def uses_uvicorn():
    import inspect

    import uvicorn
    assert "sockets" in inspect.signature(uvicorn.Server.run).parameters
    assert "timeout_graceful_shutdown" in inspect.signature(uvicorn.Config).parameters


def uses_textual_plotext():
    from textual_plotext import PlotextPlot
    plt = PlotextPlot().plt   # tui_app/screens/arena.py draws with these
    plt.clear_figure()
    plt.plot([1, 1], [900, 1100])
    plt.scatter([1], [1000], marker="●")
    plt.xticks([1], ["1"])
    plt.xlim(0.5, 1.5)
    plt.title("ratings")


def uses_openai():
    import openai
    assert hasattr(openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="x").chat.completions, "create")
    assert openai.NotFoundError and openai.AuthenticationError and openai.BadRequestError


def uses_gensim():
    from gensim.models import KeyedVectors, Word2Vec
    model = Word2Vec([["a", "b"], ["b", "c"]], vector_size=2, min_count=1, hs=1, negative=0, workers=1, epochs=1)
    assert model.wv.index_to_key[0] == "b" and len(model.wv.get_vecattr("b", "code")) >= 1
    assert hasattr(KeyedVectors, "load_word2vec_format") and hasattr(KeyedVectors, "most_similar")


# name: (first release with every API below, what Parley calls, the check)
FIRST_WITH = {
    "torch": ("2.5", "F.scaled_dot_product_attention(enable_gqa=) (2.5), F.rms_norm (2.4)", uses_torch),
    "tokenizers": ("0.20.4", "tokenizers.decoders.DecodeStream", uses_tokenizers),
    "safetensors": ("0.4", "safe_open(framework=, device=), SafetensorError, safetensors.torch/.numpy files",
                    uses_safetensors),
    "jinja2": ("3.1.6", "ImmutableSandboxedEnvironment whose |attr filter is sandboxed", uses_jinja2),
    "textual": ("8.2.8", "the widgets the app uses; pinned: the snapshot tests compare rendered screens",
                uses_textual),
    "platformdirs": ("4", "user_data_dir, user_config_dir", uses_platformdirs),
    "rich": ("14.2", "Console(file=, highlight=), print(markup=, soft_wrap=), Progress columns (textual 8.2.8 needs "
             "14.2)", uses_rich),
    "sqlite-utils": ("4.0", "db.atomic(); enable_fts and insert inside an open transaction without committing it",
                     uses_sqlite_utils),
    "numpy": ("1.24", "the arrays of engine/models/ngram.py", uses_numpy),
    "chitchat-dataset": ("0.9", "chitchat_dataset.Dataset", uses_chitchat_dataset),
    "gguf": ("0.19.0", "GGUFWriter, quants.quantize(BF16), get_tensor_name_map (QWEN3), SpecialVocab(load_merges=, "
             "n_vocab=); the floor is the release tested, not a search for an older one", uses_gguf),
    "pytest": ("8", "pytest.MonkeyPatch and the fixtures the tests use", uses_pytest),
    "transformers": ("4.45", "Auto classes, PreTrainedTokenizerFast, llama3 rope_scaling, min-p and typical warpers",
                     uses_transformers),
    "pytest-textual-snapshot": ("1.1.0", "snap_compare", uses_pytest_textual_snapshot),
    "huggingface_hub": ("0.24", "snapshot_download(local_files_only=, allow_patterns=, ignore_patterns=), "
                        "errors.LocalEntryNotFoundError, validate_repo_id (engine/hub.py)", uses_huggingface_hub),
    "hypothesis": ("6.100", "given, settings(suppress_health_check=), strategies.recursive (the importers' fuzz)",
                   uses_hypothesis),
    "starlette": ("1.10", "Starlette(routes=, exception_handlers=), Route, StreamingResponse, Request.stream(); the "
                  "floor is the release tested", uses_starlette),
    "uvicorn": ("0.55", "Server(Config(app, timeout_graceful_shutdown=)).run(sockets=), .started, .should_exit; the "
                "floor is the release tested", uses_uvicorn),
    "openai": ("3.57", "OpenAI(base_url=).chat.completions / .completions / .models and its error classes; the floor "
               "is the release tested", uses_openai),
    "textual-plotext": ("1.0.1", ("PlotextPlot and its plt (clear_figure, plot, scatter, xticks, xlim, title); the "
                                  "floor is the release tested"), uses_textual_plotext),
    "gensim": ("4.3", "KeyedVectors.load_word2vec_format, most_similar(positive, negative, topn); Word2Vec(vector_size=, "
               "sg=, hs=, negative=, workers=), wv.index_to_key and get_vecattr(code, point): the reference tests/test_word2vec.py checks "
               "against; the floor is the release tested", uses_gensim),
    "peft": ("0.21", "PeftModel.from_pretrained of a LoRA adapter onto a transformers 5 model (the release checked "
             "with transformers 5.24)", uses_peft),
}


def floor(requirement: Requirement) -> Version | None:
    """The lowest version the requirement allows, from its >=, ==, ~= or > clause."""
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=", ">")]
    return max(bounds) if bounds else None


def test_every_declared_dependency_says_what_it_is_for():
    assert sorted(DECLARED) == sorted(FIRST_WITH), \
        "pyproject.toml and FIRST_WITH in this test must name the same packages: add the new one's APIs here"


@pytest.mark.parametrize("name", sorted(FIRST_WITH))
def test_floor_is_no_lower_than_the_first_release_with_the_apis(name):
    first, what, _ = FIRST_WITH[name]
    declared = floor(DECLARED[name])
    assert declared is not None, f"{name} has no floor in pyproject.toml: declare >= {first} ({what})"
    assert declared >= Version(first), f"{name}'s floor {declared} is below {first}, the first release with {what}"


@pytest.mark.parametrize("name", sorted(FIRST_WITH))
def test_installed_version_is_in_the_declared_range(name):
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is declared in pyproject.toml but not installed: pip install -e '.[test]'")
    assert DECLARED[name].specifier.contains(installed, prereleases=True), \
        f"{name} {installed} is installed, outside the declared {DECLARED[name].specifier}"


@pytest.mark.parametrize("name", sorted(FIRST_WITH))
def test_the_apis_parley_calls_exist(name, tmp_path):
    _, what, check = FIRST_WITH[name]
    try:
        check(tmp_path) if check is uses_safetensors else check()
    except (ImportError, AttributeError, TypeError, AssertionError) as e:
        pytest.fail(f"{name} {version(name)} lacks what Parley calls ({what}): {e}")
