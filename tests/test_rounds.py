"""'Train on my rankings' (tui_app/rounds.py): its defaults, output folders and held-out prompt,
without the app (tests/test_app.py runs a whole round in it)."""
import pytest

from engine.cli import build_parser
from engine.store import Store
from tui_app.rounds import (
    DEFAULTS,
    arguments,
    held_out_prompt,
    output_folder,
    trained_conversations,
)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "home" / "parley.db") as s:
        yield s


def parsed(args):
    return vars(build_parser().parse_args(args))


@pytest.mark.parametrize("kind", ["dpo", "rm"])
def test_the_arguments_are_a_valid_parley_train_command_sized_for_the_model(kind, tmp_path):
    small = parsed(arguments(kind, "default", 6_000_000, 2, tmp_path / "o", "cpu"))
    assert (small["mode"], small["prefs"], small["lora_r"], small["device"]) == (kind, "store", None, "cpu")
    assert small["max_steps"] == DEFAULTS.min_steps and small["prompts_per_step"] == 2   # two prompts: 3 passes < 10
    assert small["lr"] == (DEFAULTS.dpo_lr if kind == "dpo" else DEFAULTS.rm_lr)
    assert small["policy" if kind == "dpo" else "base"] == "default"
    if kind == "dpo":
        assert small["beta"] == DEFAULTS.beta
    large = parsed(arguments(kind, "big", 135_000_000, 400, tmp_path / "o", None))
    assert large["lora_r"] == DEFAULTS.lora_r and large["max_steps"] == DEFAULTS.max_steps_lora
    assert large["lr"] == (DEFAULTS.dpo_lr_lora if kind == "dpo" else DEFAULTS.rm_lr_lora)
    middle = parsed(arguments(kind, "default", 6_000_000, 40, tmp_path / "o", None))
    assert middle["max_steps"] == 15 and middle["prompts_per_step"] == 8   # 3 passes over 40 prompts, 8 a step
    assert parsed(arguments(kind, "default", 6_000_000, 400, tmp_path / "o", None))["max_steps"] == DEFAULTS.max_steps


def test_output_folders_count_on_from_the_model_a_round_started_from(store):
    first = output_folder(store, "default", "dpo")
    assert first == store.path.parent / "models" / "default-dpo-1"
    first.mkdir(parents=True)
    assert output_folder(store, str(first), "dpo").name == "default-dpo-2"   # a round of a round's model
    store.add_model("default-dpo-2", "/elsewhere")
    assert output_folder(store, "default-dpo-1", "dpo").name == "default-dpo-3"
    assert output_folder(store, "/m/Qwen-0.5B/", "rm").name == "Qwen-0.5B-rm-1"


def pairs(store, conversation, user):
    ids = [store.add_message(conversation, "assistant", t, user, make_current=False) for t in ("a", "b")]
    store.vote(store.create_comparison(conversation, user, ids), "best", best=ids[0])


def test_the_held_out_prompt_comes_from_a_conversation_no_trained_pair_came_from(store):
    import json

    from engine.data import held_out
    # conversations of one prompt each, some of which the fixed split holds out
    conversations = {}
    for i in range(60):
        c = store.create_conversation(f"c{i}")
        user = store.add_message(c, "user", f"question {i}")
        pairs(store, c, user)
        conversations[c] = held_out(json.dumps(store.prompt_messages(c, user), sort_keys=True))
    trained = trained_conversations(store)
    assert trained == {c for c, out in conversations.items() if not out} and len(trained) < 60
    prompt, note = held_out_prompt(store, trained)
    assert prompt["conversation_id"] not in trained and "held-out" in note
    newest_held_out = max((c for c, out in conversations.items() if out), key=lambda c: store.conversation(c)["created_at"])
    assert prompt["conversation_id"] == newest_held_out


def test_without_a_held_out_conversation_the_latest_prompt_is_used_and_said_so(store):
    c = store.create_conversation()
    first = store.add_message(c, "user", "first")
    pairs(store, c, first)
    latest = store.add_message(c, "user", "latest")
    prompt, note = held_out_prompt(store, trained_conversations(store))
    assert prompt["id"] == latest and "no conversation was left out of training" in note
    with Store(store.path.parent / "empty.db") as empty:
        assert held_out_prompt(empty, set())[0] is None   # nothing to compare on: the round says so
