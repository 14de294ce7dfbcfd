"""Bad model directories, through the CLI: one line naming the problem, exit 1, no traceback, files untouched.

Each class of bad input is one test over many cases. A case copies a tiny good checkpoint, breaks
one thing in it, runs `parley inspect DIR` (or `parley generate` where the break only shows when
a prompt is rendered) in this process, and checks the refusal with tests/bad_input.py.
"""
import json
import shutil
import time

import pytest
import torch
from bad_input import assert_one_line_error, run_cli, unchanged
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from engine import chat_template


@pytest.fixture
def model_dir(checkpoints, tmp_path):
    path, _ = checkpoints("llama_gqa_untied")
    shutil.copytree(path, tmp_path / "m")
    return tmp_path / "m"


def edit_json(name, **changes):
    def edit(path):
        data = json.loads((path / name).read_text()) if (path / name).exists() else {}
        data.update(changes)
        (path / name).write_text(json.dumps(data))
    return edit


def drop_key(name, key):
    def edit(path):
        data = json.loads((path / name).read_text())
        del data[key]
        (path / name).write_text(json.dumps(data))
    return edit


def write(name, text):
    return lambda path: (path / name).write_text(text)


def edit_tensors(fn):
    def edit(path):
        tensors = load_file(path / "model.safetensors")
        fn(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return edit


def set_template(text):
    # transformers saves the template in chat_template.jinja, which wins over tokenizer_config.json's
    return write("chat_template.jinja", text)


def set_tensor(name, value):
    return edit_tensors(lambda t: t.update({name: value(t[name])}))


def refuse(model_dir, tmp_path, monkeypatch, words, *command):
    """Run the command on the broken directory and check the refusal; `command` defaults to inspect."""
    home = tmp_path / "home"
    argv = command or ("inspect", model_dir, "--device", "cpu")
    with unchanged(home, tmp_path):   # the model, any file it points at, and the store
        run = run_cli(*argv, home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, *words)
    return run


# -- the directory and its files as files ---------------------------------------------------------
def truncate(name, keep):
    return lambda path: (path / name).write_bytes((path / name).read_bytes()[:keep])


FILES = {
    "missing directory": (lambda p: shutil.rmtree(p), ["does not exist"]),
    "directory is a file": (lambda p: (shutil.rmtree(p), p.write_text("x")), ["is a file, not a model directory"]),
    "config.json missing": (lambda p: (p / "config.json").unlink(), ["config.json"]),
    "config.json not JSON": (write("config.json", "{not json"), ["config.json", "not valid JSON"]),
    "config.json an array": (write("config.json", "[1, 2]"), ["config.json", "JSON object"]),
    "config.json not UTF-8": (lambda p: (p / "config.json").write_bytes(b"\xff\xfe{}"), ["config.json"]),
    "weights missing": (lambda p: (p / "model.safetensors").unlink(), ["model.safetensors"]),
    "weights empty": (write("model.safetensors", ""), ["model.safetensors", "not a readable safetensors"]),
    "weights truncated": (truncate("model.safetensors", 3000), ["model.safetensors", "not a readable safetensors"]),
    "weights header only": (truncate("model.safetensors", 8), ["model.safetensors", "not a readable safetensors"]),
    "weights garbage": (write("model.safetensors", "\x00garbage"), ["not a readable safetensors"]),
    "tokenizer.json missing": (lambda p: (p / "tokenizer.json").unlink(), ["tokenizer.json"]),
    "tokenizer.json not JSON": (write("tokenizer.json", "{nope"), ["tokenizer.json", "cannot be read"]),
    "tokenizer.json wrong shape": (write("tokenizer.json", '{"model": 3}'), ["tokenizer.json", "cannot be read"]),
    "tokenizer_config.json an array": (write("tokenizer_config.json", "[]"), ["tokenizer_config.json"]),
    "generation_config.json not JSON": (write("generation_config.json", "{"), ["generation_config.json"]),
    "generation_config.json an array": (write("generation_config.json", "[2]"), ["generation_config.json"]),
}


@pytest.mark.parametrize("case", list(FILES))
def test_unreadable_files(model_dir, tmp_path, monkeypatch, case):
    break_it, words = FILES[case]
    break_it(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, words)


# -- weights: kinds, values, where the shards are -------------------------------------------------
def shard_index(target):
    """An index whose every tensor lives in `target(path)`, with a real copy of the weights there."""
    def edit(path):
        where = target(path)
        (path.parent / "base").mkdir()
        shutil.copy(path / "model.safetensors", path.parent / "base" / "model.safetensors")
        names = load_file(path / "model.safetensors").keys()
        (path / "model.safetensors").unlink()
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: where for n in names}}))
    return edit


def big_values(t):
    return torch.full_like(t, 1e6)   # finite in float32, infinite once cast to float16


WEIGHTS = {
    "int64 weight": (set_tensor("model.norm.weight", lambda t: t.long()), ["'model.norm.weight'", "int64"]),
    "int8 weight": (set_tensor("lm_head.weight", lambda t: t.to(torch.int8)), ["'lm_head.weight'", "int8"]),
    "bool weight": (set_tensor("model.norm.weight", lambda t: t > 0), ["'model.norm.weight'", "bool"]),
    "NaN weight": (set_tensor("model.layers.1.mlp.up_proj.weight", lambda t: t.index_fill(0, torch.tensor([3]),
                   float("nan"))), ["'model.layers.1.mlp.up_proj.weight'", "NaN"]),
    "inf weight": (set_tensor("model.embed_tokens.weight", lambda t: t.index_fill(1, torch.tensor([0]),
                   float("-inf"))), ["'model.embed_tokens.weight'", "infinite"]),
    "NaN in float16 weight": (set_tensor("model.norm.weight", lambda t: torch.full_like(t, float("nan")).half()),
                              ["'model.norm.weight'", "NaN"]),
    "shard outside, relative": (shard_index(lambda p: "../base/model.safetensors"),
                                ["../base/model.safetensors", "outside the model directory"]),
    "shard outside, absolute": (shard_index(lambda p: str(p.parent / "base" / "model.safetensors")),
                                ["outside the model directory"]),
    "shard outside, nested ..": (shard_index(lambda p: "sub/../../base/model.safetensors"),
                                 ["outside the model directory"]),
    "index without weight_map": (write("model.safetensors.index.json", '{"weight_map": ["a"]}'), ["weight_map"]),
    "index shard missing": (write("model.safetensors.index.json", '{"weight_map": {"a": "x.safetensors"}}'),
                            ["'x.safetensors'", "missing"]),
}


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_bad_weights(model_dir, tmp_path, monkeypatch, case):
    break_it, words = WEIGHTS[case]
    break_it(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, words)


def test_weights_that_overflow_float16_say_so(model_dir, tmp_path, monkeypatch):
    set_tensor("model.norm.weight", big_values)(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, ["'model.norm.weight'", "too large for float16", "--dtype"],
           "inspect", model_dir, "--device", "cpu", "--dtype", "float16")


# -- weights that do not fit config.json, and what Parley does not run -----------------------------
def pickled_only(path):
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled, never opened")


MISMATCH = {
    "pickled weights only": (pickled_only, ["only pickled PyTorch weights (pytorch_model.bin)", "never unpickles",
                                            "safe_serialization=True"]),
    "unsupported model type": (edit_json("config.json", model_type="bert"),
                               ["model_type 'bert' is not supported: use one of gpt2, llama, mistral, qwen2"]),
    "config missing a field": (drop_key("config.json", "hidden_size"), ["config.json", "lacks 'hidden_size'"]),
    "unknown tensor name": (edit_tensors(lambda t: t.update({"model.layers.0.mlp.gate.weight":
                                                               t.pop("model.layers.0.mlp.gate_proj.weight")})),
                            ["tensor 'model.layers.0.mlp.gate.weight' is not part of the model"]),
    "wrong tensor shape": (edit_tensors(lambda t: t.update({"model.norm.weight": torch.ones(65)})),
                           ["tensor 'model.norm.weight' has shape [65] but config.json implies [64]"]),
    "missing tensor": (edit_tensors(lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")),
                       ["tensor 'model.layers.1.self_attn.k_proj.weight' is missing"]),
    "unsupported rope": (edit_json("config.json", rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                         ["rope scaling type 'yarn' is not supported: use one of default, linear, llama3"]),
}


@pytest.mark.parametrize("case", list(MISMATCH))
def test_weights_or_config_parley_cannot_run(model_dir, tmp_path, monkeypatch, case):
    break_it, words = MISMATCH[case]
    break_it(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, words)


# -- config.json's fields ----------------------------------------------------------------------
CONFIG = {
    "max_position_embeddings text": ({"max_position_embeddings": "abc"}, ["max_position_embeddings", "'abc'"]),
    "max_position_embeddings negative": ({"max_position_embeddings": -1}, ["max_position_embeddings", "-1"]),
    "hidden_size zero": ({"hidden_size": 0}, ["hidden_size", "1 or more"]),
    "hidden_size a float": ({"hidden_size": 64.0}, ["hidden_size", "64.0", "whole number"]),
    "hidden_size a bool": ({"hidden_size": True}, ["hidden_size", "whole number"]),
    "vocab_size text": ({"vocab_size": "x"}, ["vocab_size", "'x'"]),
    "num_hidden_layers a list": ({"num_hidden_layers": [2]}, ["num_hidden_layers"]),
    "heads do not divide width": ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
                                  ["num_attention_heads 3 does not divide hidden_size 64"]),
    "kv heads do not divide heads": ({"num_key_value_heads": 3}, ["num_key_value_heads 3 does not divide"]),
    "num_attention_heads zero": ({"num_attention_heads": 0}, ["num_attention_heads", "1 or more"]),
    "rms_norm_eps text": ({"rms_norm_eps": "small"}, ["rms_norm_eps", "finite number"]),
    "rope_theta infinite": ({"rope_theta": 1e400}, ["rope_theta", "finite number"]),
    "tie_word_embeddings text": ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings", "true or false"]),
    "rope_scaling text": ({"rope_scaling": "linear"}, ["rope_scaling", "JSON object"]),
    "model_type a number": ({"model_type": 7}, ["model_type"]),
}


@pytest.mark.parametrize("case", list(CONFIG))
def test_bad_config_fields(model_dir, tmp_path, monkeypatch, case):
    changes, words = CONFIG[case]
    if case == "rope_theta infinite":   # json.dumps writes Infinity, which Python's JSON reads back as inf
        changes = {"rope_theta": float("inf")}
    edit_json("config.json", **changes)(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, ["config.json", *words])


# -- generation_config.json and config.json's end-of-reply ids ------------------------------------
EOS = {
    "text": ("generation_config.json", "two"),
    "out of vocab": ("generation_config.json", 999999),
    "negative": ("generation_config.json", -1),
    "a bool": ("generation_config.json", True),
    "list with text": ("generation_config.json", [2, "x"]),
    "float": ("generation_config.json", 2.0),
    "config.json out of vocab": ("config.json", 999999),
}


@pytest.mark.parametrize("case", list(EOS))
def test_bad_eos_ids(model_dir, tmp_path, monkeypatch, case):
    file, value = EOS[case]
    edit_json(file, eos_token_id=value)(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, [file, "eos_token_id", "not a token id"])


# -- tokenizer against model ----------------------------------------------------------------------
def bigger_tokenizer(path):
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(5)])
    tok.save(str(path / "tokenizer.json"))


def one_token_tokenizer(path):
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(path / "tokenizer.json"))


TOKENIZER = {
    "ids past the model's vocab": (bigger_tokenizer, ["tokenizer.json", "embeds only ids 0 to"]),
    "a one-token tokenizer": (one_token_tokenizer, ["tokenizer.json", "1 token", "at least two"]),
    "eos token not in vocab": (edit_json("tokenizer_config.json", eos_token="<|nope|>"),
                               ["tokenizer_config.json", "'<|nope|>'"]),
    "eos token a number": (edit_json("tokenizer_config.json", eos_token=5), ["tokenizer_config.json", "eos_token"]),
    "chat template a number": (lambda p: ((p / "chat_template.jinja").unlink(),
                                          edit_json("tokenizer_config.json", chat_template=5)(p)), ["chat_template"]),
}


@pytest.mark.parametrize("case", list(TOKENIZER))
def test_tokenizer_that_does_not_fit(model_dir, tmp_path, monkeypatch, case):
    break_it, words = TOKENIZER[case]
    break_it(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, words)


# -- chat templates -------------------------------------------------------------------------------
TEMPLATES = {
    "division by zero": ("{{ (1/0) }}", ["ZeroDivisionError"]),
    "huge range": ("{% for i in range(10**9) %}{% endfor %}", ["builds a value", "limit"]),
    "endless recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", ["RecursionError"]),
    "huge repeat": ("{{ 'ab ' * 30000000 }}", ["builds a value", "characters", "limit"]),
    "huge repeat, int first": ("{{ 30000000 * 'ab ' }}", ["builds a value", "characters", "limit"]),
    "doubling with ~": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", ["builds a string", "characters", "limit"]),
    "doubling with +": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s }}", ["builds a value", "characters", "limit"]),
    "huge width filter": ("{{ 'a'|center(1000000000) }}", ["builds a value", "characters", "limit"]),
    "huge width format": ("{{ '%099999999999d' % 1 }}", ["builds a value", "characters", "limit"]),
    "huge width str.format": ("{{ '{:>999999999}'.format(1) }}", ["builds a value", "characters", "limit"]),
    "huge width format filter": ("{{ '%099999999999d'|format(1) }}", ["builds a value", "characters", "limit"]),
    "huge power": ("{{ 2 ** 100000000 }}", ["builds a number", "limit"]),
    "huge output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", ["builds a prompt", "limit"]),
    "syntax error": ("{% for %}", ["syntax error"]),
    "raise_exception with newlines": ("{{ raise_exception('no\nsystem\nrole') }}", ["refused", "no system role"]),
    "sandbox escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ["chat template", "sandbox forbids"]),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_chat_template_that_fails(model_dir, tmp_path, monkeypatch, case):
    template, words = TEMPLATES[case]
    set_template(template)(model_dir)
    start = time.monotonic()
    refuse(model_dir, tmp_path, monkeypatch, ["chat template", *words],
           "generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu")
    assert time.monotonic() - start < 10   # refused well before building it (it once ran 42 s, then aborted)


def test_chat_template_that_runs_too_long_stops_at_the_limit(model_dir, tmp_path, monkeypatch):
    # Nested loops that build nothing and call nothing: only the clock stops them (each loop start checks it).
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.3)
    set_template("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}"
              "{% endfor %}{% endfor %}")(model_dir)
    start = time.monotonic()
    refuse(model_dir, tmp_path, monkeypatch, ["chat template", "longer than 0.3 s"],
           "generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu")
    assert time.monotonic() - start < 5


def test_exponential_macro_stops_at_the_limit(model_dir, tmp_path, monkeypatch):
    # No loop at all: each macro call checks the clock.
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.3)
    set_template("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}"
              "{% endif %}{% endmacro %}{{ f(40) }}")(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, ["chat template", "longer than 0.3 s"],
           "generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu")


# -- what must still load -------------------------------------------------------------------------
def padded_embeddings(path):
    """A model whose embedding has 64 rows more than its tokenizer, as many real checkpoints do."""
    config = json.loads((path / "config.json").read_text())
    edit_json("config.json", vocab_size=config["vocab_size"] + 64)(path)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        set_tensor(name, lambda t: torch.cat([t, torch.zeros(64, t.shape[1])]))(path)


def symlinked_shard(path):
    """A Hugging Face cache snapshot: the index names a plain file, which is a symlink out of the directory."""
    (path.parent / "blobs").mkdir()
    shutil.move(path / "model.safetensors", path.parent / "blobs" / "abc123")
    (path / "model-00001-of-00001.safetensors").symlink_to(path.parent / "blobs" / "abc123")
    names = load_file(path / "model-00001-of-00001.safetensors").keys()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))


GOOD = {
    "as saved": lambda p: None,
    "padded embeddings": padded_embeddings,
    "symlinked shard": symlinked_shard,
    "head_dim that need not divide": edit_json("config.json", num_attention_heads=3, num_key_value_heads=1,
                                               head_dim=16),
    "eos ids as a list": edit_json("generation_config.json", eos_token_id=[2, 3]),
    "eos id null": edit_json("generation_config.json", eos_token_id=None),
    "rope_theta an int": edit_json("config.json", rope_theta=10000),
}


@pytest.mark.parametrize("case", list(GOOD))
def test_sound_directories_still_load_and_generate(model_dir, tmp_path, monkeypatch, case):
    if case == "head_dim that need not divide":   # 3 heads of 16 on a width of 64: attention weights to match
        tensors = load_file(model_dir / "model.safetensors")
        for layer in range(2):
            a = f"model.layers.{layer}.self_attn."
            tensors[a + "q_proj.weight"] = torch.randn(48, 64) * 0.1
            tensors[a + "k_proj.weight"] = torch.randn(16, 64) * 0.1
            tensors[a + "v_proj.weight"] = torch.randn(16, 64) * 0.1
            tensors[a + "o_proj.weight"] = torch.randn(64, 48) * 0.1
        save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    GOOD[case](model_dir)
    run = run_cli("generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu",
                  "--seed", "0", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert run.rc == 0, run.err
