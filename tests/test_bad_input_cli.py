"""Bad input to the command line: outputs, training arguments, generation limits, terminal output, config.

Every refusal is checked the same way (tests/bad_input.py): exit status, one line on stderr that
names the problem, and the store and the files on disk exactly as they were.
"""
import json

import pytest

from bad_input import assert_one_line_error, files_under, run_cli, unchanged
from engine import generate as generation
from engine.terminal import printable
from tui_app.main import run_app

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x9b1m"


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("qwen2")[0]


@pytest.fixture(scope="module")
def escaping_model(tmp_path_factory):
    """A real n-gram model counted on text full of terminal escapes: greedy decoding writes them."""
    from engine.train.ngram import train_ngram
    from engine.train.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("escaping")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i} says {ESCAPES} and stops\n" for i in range(200)), encoding="utf-8")
    train_tokenizer([corpus.read_text()], 300).save(root / "tok")
    lm = train_ngram(str(root / "tok"), str(corpus), 4, "mle")
    lm.save(root / "ngram")
    return root / "ngram"


# -- outputs: never into a directory of someone else's files -------------------------------------------
REQUIRED = {
    "tokenizer": [],
    "ngram": ["--tokenizer", "TOK"],
    "pretrain": ["--preset", "chat-6m", "--tokenizer", "TOK"],
    "sft": ["--model", "MODEL"],
    "rm": ["--base", "MODEL", "--prefs", "store"],
    "dpo": ["--policy", "MODEL", "--prefs", "store"],
    "ppo": ["--policy", "MODEL", "--reward-model", "MODEL"],
    "rloo": ["--policy", "MODEL", "--reward-model", "MODEL"],
    "grpo": ["--policy", "MODEL", "--reward-model", "MODEL"],
}


def train_args(mode, model, out, *extra):
    args = [str(model) if a in ("MODEL", "TOK") else a for a in REQUIRED[mode]]
    return ["train", mode, *args, "--out", out, *extra]


@pytest.mark.parametrize("mode", REQUIRED)
def test_an_out_holding_foreign_files_is_refused_untouched(mode, model, home, tmp_path, monkeypatch):
    out = tmp_path / "data"
    (out / "notes").mkdir(parents=True)
    (out / "corpus.txt").write_text("my training corpus")
    (out / "notes" / "todo.md").write_text("keep me")
    with unchanged(home, tmp_path):
        run = run_cli(*train_args(mode, model, out), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, str(out), "did not write", "corpus.txt", "new or empty directory")


@pytest.mark.parametrize("mode", ["tokenizer", "ngram", "sft", "dpo", "grpo"])
def test_an_out_that_is_a_file_is_refused_before_any_work(mode, model, home, tmp_path, monkeypatch):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"not a directory")
    with unchanged(home, tmp_path):
        run = run_cli(*train_args(mode, model, out), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, str(out), "is a file")


def test_a_second_tokenizer_goes_beside_the_files_it_did_not_write(home, tmp_path, monkeypatch):
    """Parley's own output, with the person's notes added, is written again: the notes stay."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"sentence number {i} is here\n" for i in range(60)))
    out = tmp_path / "tok"
    for vocab in (300, 320):
        run = run_cli("train", "tokenizer", "--data", corpus, "--vocab-size", vocab, "--out", out,
                      home=home, monkeypatch=monkeypatch)
        assert run.rc == 0, run.err
        (out / "notes.md").write_text("why this tokenizer")
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"].__len__() == 320
    assert (out / "notes.md").read_text() == "why this tokenizer" and corpus.exists()


def test_a_marker_cannot_make_parley_remove_files_elsewhere(home, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"sentence number {i} is here\n" for i in range(60)))
    out = tmp_path / "tok"
    assert run_cli("train", "tokenizer", "--data", corpus, "--vocab-size", 300, "--out", out,
                   home=home, monkeypatch=monkeypatch).rc == 0
    (out / ".parley-output").write_text(json.dumps({"files": ["../corpus.txt", "/etc/hostname", "tokenizer.json"]}))
    assert run_cli("train", "tokenizer", "--data", corpus, "--vocab-size", 300, "--out", out,
                   home=home, monkeypatch=monkeypatch).rc == 0
    assert corpus.exists() and (out / "tokenizer.json").exists()


# -- training arguments: checked before any work ----------------------------------------------------
BAD_TRAINING = [
    ("pretrain", ["--batch-size", 0], "--batch-size 0", "1 or more"),
    ("pretrain", ["--seq-len", 0], "--seq-len 0", "1 or more"),
    ("pretrain", ["--lr", -1], "--lr -1", "greater than 0"),
    ("pretrain", ["--lr", "nan"], "--lr nan", "greater than 0"),
    ("sft", ["--lr", "inf"], "--lr inf", "greater than 0"),
    ("sft", ["--max-steps", 0], "--max-steps 0", "1 or more"),
    ("sft", ["--warmup-steps", -1], "--warmup-steps -1", "0 or more"),
    ("sft", ["--min-lr-ratio", 1.5], "--min-lr-ratio 1.5", "between 0 and 1"),
    ("sft", ["--seed", -1], "--seed -1", "2**63"),
    ("sft", ["--seed", 2**63], "--seed", "2**63"),
    ("dpo", ["--beta", 0], "--beta 0", "greater than 0"),
    ("rm", ["--max-len", 0], "--max-len 0", "1 or more"),
    ("ppo", ["--gamma", 2], "--gamma 2", "between 0 and 1"),
    ("ppo", ["--lam", -0.5], "--lam -0.5", "between 0 and 1"),
    ("ppo", ["--ema", 1.0], "--ema 1.0", "both excluded"),
    ("ppo", ["--beta", -0.1], "--beta -0.1", "0 or more"),
    ("ppo", ["--clip", 0], "--clip 0", "greater than 0"),
    ("rloo", ["--replies", 1], "--replies 1", "2 or more"),
    ("grpo", ["--temperature", 0], "--temperature 0", "greater than 0"),
    ("grpo", ["--max-new-tokens", 0], "--max-new-tokens 0", "1 or more"),
    ("tokenizer", ["--vocab-size", 0], "--vocab-size 0", "1 or more"),
    ("ngram", ["--order", 0], "--order 0", "1 or more"),
]


@pytest.mark.parametrize("mode, extra, named, rule", BAD_TRAINING, ids=lambda v: str(v))
def test_a_bad_training_number_is_refused_before_any_work(mode, extra, named, rule, model, home, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "out"
    with unchanged(home, tmp_path):
        run = run_cli(*train_args(mode, model, out, *extra), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, named, rule)
    assert not out.exists()


@pytest.mark.parametrize("extra, named", [(["--lr", "fast"], "--lr"), (["--batch-size", "4.5"], "--batch-size"),
                                          (["--autocast", "fp8"], "--autocast"), (["--bogus", "1"], "--bogus")])
def test_an_unreadable_flag_gets_one_line_from_argparse(extra, named, model, home, tmp_path, monkeypatch):
    with unchanged(home, tmp_path):
        run = run_cli(*train_args("sft", model, tmp_path / "out", *extra), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, named, "--help", rc=2)


# -- generation: limits, seeds, text -----------------------------------------------------------------------
def generate_args(model, *extra):
    return ["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", 3, "--device", "cpu", *extra]


BAD_GENERATE = [
    (["--n", 0], ["--n 0", "between 1 and"]),
    (["--n", 1_000_000_000], ["--n 1000000000", "between 1 and"]),
    (["--n", 100_000], ["--n 100000"]),
    (["--num-beams", 1_000_000], ["1000000 rows", "fewer candidates or beams"]),
    (["--num-beams", 600, "--n", 2], ["1200 rows"]),
    (["--seed", 2**63 - 1, "--n", 2], ["--seed", "2**63 - 1", "smaller --seed"]),
    (["--seed", -1], ["seed = -1", "2**63 - 1"]),
    (["--temperature", -1], ["temperature = -1", "between 0"]),
    (["--top-p", 0], ["top_p = 0", "(0, 1]"]),
    (["--min-new-tokens", 9], ["min_new_tokens", "max_new_tokens (3)"]),
    (["--stop", ""], ["stop", "non-empty"]),
]


@pytest.mark.parametrize("extra, words", BAD_GENERATE, ids=lambda v: str(v))
def test_a_bad_generation_request_is_refused(extra, words, model, home, tmp_path, monkeypatch):
    with unchanged(home, tmp_path):
        run = run_cli(*generate_args(model, *extra), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, *words)
    assert run.out == ""


def test_rows_that_do_not_fit_in_memory_are_refused_before_allocating(model, home, tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "available_memory", lambda device: 2**20)   # a machine with 1 MiB free
    with unchanged(home, tmp_path):
        run = run_cli(*generate_args(model, "--n", 64), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, "64 rows", "GiB free", "fewer candidates")


@pytest.mark.parametrize("flag", ["--prompt", "--system"])
def test_a_prompt_that_is_not_utf8_is_refused(flag, model, home, tmp_path, monkeypatch):
    text = b"caf\xff".decode("utf-8", "surrogateescape")   # how Python hands over a non-UTF-8 argument
    args = generate_args(model, "--system", text) if flag == "--system" else \
        ["generate", "--model", model, "--prompt", text, "--max-new-tokens", 3, "--device", "cpu"]
    with unchanged(home, tmp_path):
        run = run_cli(*args, home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, flag, "not valid UTF-8", "0xff")


@pytest.mark.parametrize("extra", [[], ["--n", 2], ["--temperature", 0, "--n", 2, "--seed", 1]])
def test_model_text_reaches_the_terminal_with_its_escapes_visible(extra, escaping_model, home, monkeypatch):
    run = run_cli("generate", "--model", escaping_model, "--prompt", "line 7 says", "--raw", "--temperature", 0,
                  "--max-new-tokens", 40, "--device", "cpu", *extra, home=home, monkeypatch=monkeypatch)
    assert run.rc == 0, run.err
    assert not any(c in run.out for c in "\x1b\x07\x9b")
    assert printable(ESCAPES) in run.out


def test_json_keeps_the_exact_text(escaping_model, home, monkeypatch):
    run = run_cli("generate", "--model", escaping_model, "--prompt", "line 7 says", "--raw", "--temperature", 0,
                  "--max-new-tokens", 40, "--device", "cpu", "--json", home=home, monkeypatch=monkeypatch)
    assert run.rc == 0 and "\x1b" not in run.out   # JSON escapes control characters itself
    assert ESCAPES in json.loads(run.out)["text"]


def test_printable_escapes_every_control_character_but_newline_and_tab():
    assert printable("a\tb\nc\x00\x1b\x7f\x85\x9f\u200bé") == "a\tb\nc\\x00\\x1b\\x7f\\x85\\x9f\u200bé"


def test_an_error_that_quotes_escapes_shows_them_as_text(home, tmp_path, monkeypatch):
    missing = tmp_path / "evil\x1b]0;title\x07dir"
    run = run_cli("inspect", missing, home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, "\\x1b]0;title\\x07dir", "does not exist")
    assert "\x1b" not in run.err


# -- the app's config: a bad config.toml stops the start with one line --------------------------------------
BAD_CONFIG = [
    ('keys = "ctrl+g"\n', ["[keys] must be a table"]),
    ('[keys]\nregenerate = 5\n', ["line 2", "not a string"]),
    ('[keys]\nregenerate = ""\n', ["line 2", "not a key name"]),
    ('[keys]\nregenerate = "ctrl+nosuchkey"\n', ["line 2", "not a key name"]),
    ('[keys]\nfly_away = "f12"\n', ["line 2", "'fly_away' is not an action"]),
    ('[keys]\nregenerate = "f12"\nnew_conversation = "f12"\n', ['"f12" is already the key of']),
    ('[keys\nregenerate = "f12"\n', ["not valid TOML"]),
]


@pytest.mark.parametrize("text, words", BAD_CONFIG, ids=lambda v: str(v)[:30])
def test_a_bad_config_stops_the_app_with_one_line(text, words, home, monkeypatch):
    home.mkdir()
    (home / "config.toml").write_text(text)
    with unchanged(home, home):
        run = run_cli("app", home=home, monkeypatch=monkeypatch, app=run_app)
    assert_one_line_error(run, "config.toml", *words)


def test_a_config_that_is_not_utf8_stops_the_app_with_one_line(home, monkeypatch):
    home.mkdir()
    (home / "config.toml").write_bytes(b'system_prompt = "caf\xff"\n')
    before = files_under(home)
    run = run_cli("app", home=home, monkeypatch=monkeypatch, app=run_app)
    assert_one_line_error(run, "config.toml", "not valid TOML")
    assert files_under(home) == before
