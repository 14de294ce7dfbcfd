"""`parley generate`: the stable command line that external checks use."""
import json
import subprocess
import sys

import pytest

import engine
from engine.generate import generate
from engine.settings import Settings


def parley(*args):
    return subprocess.run([sys.executable, "-c", "from tui_app.main import main; main()", *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("qwen2")[0]


def test_help_lists_the_subcommands():
    run = parley("--help")
    assert run.returncode == 0
    for command in ("app", "inspect", "generate"):
        assert command in run.stdout


def test_generate_json_matches_the_engine(model):
    run = parley("generate", "--model", model, "--prompt", "Hello there!", "--system", "Be brief.", "--n", 3,
                 "--seed", 10, "--temperature", 0.9, "--top-k", 20, "--max-new-tokens", 7, "--device", "cpu", "--json")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["candidate"] for line in lines] == [0, 1, 2]
    lm = engine.load(model, device="cpu")
    prompt = lm.tokenizer.encode_chat([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hello there!"}])
    for i, line in enumerate(lines):
        assert line["settings"]["seed"] == 10 + i and line["settings"]["top_k"] == 20
        assert set(line["timings"]) >= {"prefill_s", "decode_s", "decode_tokens_per_s"}
        expected = generate(lm, prompt, Settings.from_dict(line["settings"]))[0]
        assert (line["token_ids"], line["text"], line["finish_reason"]) == \
            (expected.token_ids, expected.text, expected.finish_reason)


def test_raw_prompt_skips_the_chat_template(model):
    run = parley("generate", "--model", model, "--prompt", "Once upon a time", "--raw", "--temperature", 0,
                 "--max-new-tokens", 5, "--json", "--device", "cpu")
    lm = engine.load(model, device="cpu")
    expected = generate(lm, lm.tokenizer.encode("Once upon a time"), Settings(temperature=0, max_new_tokens=5))[0]
    assert json.loads(run.stdout)["token_ids"] == expected.token_ids


def test_plain_output_streams_the_text(model):
    run = parley("generate", "--model", model, "--prompt", "Hi", "--temperature", 0, "--max-new-tokens", 6,
                 "--device", "cpu")
    lm = engine.load(model, device="cpu")
    expected = generate(lm, lm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}]),
                        Settings(temperature=0, max_new_tokens=6))[0]
    assert run.stdout == expected.text + "\n"


def test_beam_search_from_the_command_line(model):
    run = parley("generate", "--model", model, "--prompt", "Hi", "--num-beams", 3, "--temperature", 0,
                 "--max-new-tokens", 5, "--json", "--device", "cpu", "--stop", "zz")
    line = json.loads(run.stdout)
    assert line["settings"]["num_beams"] == 3 and line["settings"]["stop"] == ["zz"] and len(line["beams"]) == 1


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "top_p = 0.0 is out of range"),
    (["--temperature", "-1"], "temperature = -1.0 is out of range"),
    (["--num-beams", "0"], "num_beams = 0 is out of range"),
    (["--n", "0"], "--n 0 is out of range"),
    (["--model", "no-such-model"], "no model directory or known model named 'no-such-model'"),
])
def test_bad_generate_options_give_one_line(model, args, message):
    run = parley("generate", "--model", model, "--prompt", "Hi", *args)
    assert run.returncode == 1
    assert run.stderr.startswith("parley: error: ") and message in run.stderr and run.stderr.count("\n") == 1


def test_every_trainer_config_field_has_a_flag_with_help():
    """The train command line is generated from the config dataclasses: no field is left without
    a flag, and a flag's value reaches the config."""
    from dataclasses import fields

    from engine.cli import build_parser, config_from_args
    from engine.train.config import CONFIGS
    parser = build_parser()
    modes = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions
                 if a.dest == "mode").choices
    assert set(modes) == set(CONFIGS)
    for mode, config_class in CONFIGS.items():
        flags = {a.dest: a for a in modes[mode]._actions}
        for f in fields(config_class):
            assert f.name in flags, f"parley train {mode} has no flag for {f.name}"
            assert flags[f.name].help, f"--{f.name} of parley train {mode} has no help"
    args = parser.parse_args(["train", "ppo", "--policy", "p", "--reward-model", "r", "--out", "o", "--ppo-epochs", "2",
                              "--clip", "0.3", "--vf-coef", "0.5", "--lr-schedule", "linear", "--ema", "0.9"])
    config = config_from_args(CONFIGS["ppo"], args)
    assert (config.ppo_epochs, config.clip, config.vf_coef, config.lr_schedule, config.ema) == (2, 0.3, 0.5, "linear", 0.9)
    assert config.minibatch_size == 8 and config.mode == "ppo"        # defaults kept
    args = parser.parse_args(["train", "rm", "--base", "b", "--prefs", "store", "--out", "o", "--no-reward-scale"])
    assert config_from_args(CONFIGS["rm"], args).reward_scale is False
    args = parser.parse_args(["train", "grpo", "--policy", "p", "--reward-model", "r", "--out", "o", "--replies", "3"])
    grpo = config_from_args(CONFIGS["grpo"], args)
    assert (grpo.replies, grpo.beta, grpo.kl_estimator) == (3, 0.04, "k3")


def test_train_without_its_required_options_says_which_in_one_line():
    run = parley("train", "ppo", "--out", "x")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--policy" in run.stderr and "--reward-model" in run.stderr
