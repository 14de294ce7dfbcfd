"""The terminal app, driven with Textual's Pilot on a tiny model."""
import asyncio
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_bert
from textual.widgets import Input, Label, Markdown, Static

from engine.settings import Settings
from engine.store import Store
from engine.tokenizer import Tokenizer
from tui_app.app import ParleyApp
from tui_app.screens import ChatScreen, CompareScreen
from tui_app.widgets import PromptArea

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def app(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    path, _ = checkpoints("qwen2")
    return ParleyApp(model=str(path), store=Store(), device="cpu")   # the database under PARLEY_HOME


def sync(test):
    """Run an async test with asyncio.run (no async pytest plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))
    return run


async def until(pilot, condition, timeout=30.0):
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError("timed out waiting for the app")


async def send(pilot, text):
    prompt = pilot.app.screen.query_one(PromptArea)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")


def set_setting(screen, name, value):
    screen.query_one(f"#set-{name}", Input).value = str(value)


def streaming_text(screen):
    """Whether a reply on the screen has shown its first tokens."""
    return screen.replies is not None and any(v.markdown_stream for v in screen.views.values())


def replies(store):
    rows = store.db.query("SELECT id FROM messages WHERE role = 'assistant' ORDER BY created_at, rowid")
    return [store.message(r["id"]) for r in rows]


@sync
async def test_send_streams_a_reply_and_saves_it(app):
    async with app.run_test(size=(160, 50)) as pilot:
        screen = app.screen
        set_setting(screen, "max_new_tokens", 12)
        await send(pilot, "Hello there!")
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
        await pilot.pause(0.2)
        reply = replies(app.store)[0]
        view = screen.views[reply["id"]]
        assert view.message["content"] == reply["content"]
        assert "tok/s" in str(screen.query_one("#status").render())
        assert reply["settings"]["max_new_tokens"] == 12


@sync
async def test_markup_looking_text_is_shown_literally(app):
    async with app.run_test(size=(160, 50)) as pilot:
        set_setting(app.screen, "max_new_tokens", 2)
        await send(pilot, "[bold]not bold[/] and [red]x[/red]")
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
        user_view = next(v for v in app.screen.views.values() if v.message["role"] == "user")
        assert str(user_view.query_one(".content", Static).render()) == "[bold]not bold[/] and [red]x[/red]"
        # a reply with markup-looking text, as a model might write it
        conversation = app.store.conversations()[0]["id"]
        reply = app.store.add_message(conversation, "assistant", "Use [bold] and [/] tags, or [red]this[/red].")
        await app.screen.open_conversation(conversation)
        await pilot.pause(0.2)
        markdown = app.screen.views[reply].query_one(Markdown)
        text = " ".join(str(block.render()) for block in markdown.query("MarkdownBlock"))
        assert "[bold] and [/] tags, or [red]this[/red]." in text


@sync
async def test_terminal_escapes_in_text_are_shown_as_text(app):
    """A model (or an import) can put escape sequences in a reply or a title; the screen shows them
    as `\\x1b`, never passing them to the terminal, which would obey them."""
    escapes = "\x1b]0;pwned\x07\x1b[2J"
    conversation = app.store.create_conversation(f"title {escapes}")
    user = app.store.add_message(conversation, "user", f"user {escapes}")
    reply = app.store.add_message(conversation, "assistant", f"reply {escapes}", user)
    async with app.run_test(size=(160, 50)) as pilot:
        await app.screen.open_conversation(conversation)
        await pilot.pause(0.3)
        shown = [str(app.screen.views[user].query_one(".content", Static).render()),
                 " ".join(str(b.render()) for b in app.screen.views[reply].query("MarkdownBlock")),
                 str(app.screen.query_one("#conversations ListItem Label", Label).render()), app.screen.sub_title]
        for text in shown:
            assert "\x1b" not in text and "\\x1b]0;pwned\\x07\\x1b[2J" in text, text
        app.notify(f"error: {escapes}")
        await pilot.pause(0.1)
        assert all("\x1b" not in n.message for n in app._notifications)


@sync
async def test_escape_stops_and_the_partial_reply_is_kept(app):
    async with app.run_test(size=(160, 50)) as pilot:
        set_setting(app.screen, "max_new_tokens", 2000)
        set_setting(app.screen, "min_new_tokens", 2000)   # only Esc can end it
        await send(pilot, "Tell me a long story")
        await until(pilot, lambda: streaming_text(app.screen))
        await pilot.press("escape")
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
        assert replies(app.store)[0]["finish_reason"] == "cancelled"


@sync
async def test_regenerate_and_branch_navigation(app):
    async with app.run_test(size=(160, 50)) as pilot:
        set_setting(app.screen, "max_new_tokens", 4)
        await send(pilot, "Hello")
        await until(pilot, lambda: len(replies(app.store)) == 1 and replies(app.store)[0]["status"] == "complete")
        await pilot.press("ctrl+r")
        await until(pilot, lambda: len(replies(app.store)) == 2 and replies(app.store)[1]["status"] == "complete")
        first, second = replies(app.store)
        assert first["parent_id"] == second["parent_id"]
        conversation = app.store.conversations()[0]["id"]
        assert app.store.conversation(conversation)["current_leaf"] == second["id"]
        await pilot.pause(0.2)
        await pilot.press("alt+left")
        await until(pilot, lambda: app.store.conversation(conversation)["current_leaf"] == first["id"])
        assert "‹ 1/2 ›" in str(app.screen.views[first["id"]].query_one(Label).render())
        await pilot.press("alt+right")
        await until(pilot, lambda: app.store.conversation(conversation)["current_leaf"] == second["id"])


@sync
async def test_settings_change_mid_stream_applies_to_the_rest(app):
    async with app.run_test(size=(160, 50)) as pilot:
        set_setting(app.screen, "max_new_tokens", 2000)
        set_setting(app.screen, "min_new_tokens", 2000)   # the reply cannot end before the change
        await send(pilot, "Go on")
        await until(pilot, lambda: streaming_text(app.screen))
        set_setting(app.screen, "temperature", 0.25)
        await pilot.pause(0.5)
        await pilot.press("escape")
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete", 60)
        reply = replies(app.store)[0]
        first, *later = reply["segments"]
        # stored as segments: the settings it started with, then from which token the change held
        assert reply["settings"] == first["settings"] and first["settings"]["temperature"] != 0.25
        assert later and later[-1]["settings"]["temperature"] == 0.25 and later[-1]["from"] > 0
        assert reply["finish_reason"] == "cancelled"


async def open_compare(pilot, max_new_tokens):
    """Send a message, wait for its reply, and open the compare view on it with its panes done."""
    app = pilot.app
    set_setting(app.screen, "max_new_tokens", max_new_tokens)
    await send(pilot, "Hi")
    await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
    await pilot.press("ctrl+o")
    await until(pilot, lambda: isinstance(app.screen, CompareScreen))
    await until(pilot, lambda: app.screen.comparison_id and app.screen.replies is None)


@sync
async def test_compare_and_rank_writes_pairs(app):
    async with app.run_test(size=(200, 50)) as pilot:
        await open_compare(pilot, max_new_tokens=5)
        await pilot.press("ctrl+up")   # three panes
        await until(pilot, lambda: app.screen.n == 3 and app.screen.comparison_id and app.screen.replies is None)
        await until(pilot, lambda: len(app.store.comparison(app.screen.comparison_id)["candidates"]) == 3
                    and all(m["status"] == "complete" for m in app.store.comparison(app.screen.comparison_id)["candidates"]))
        ids = app.screen.message_ids
        # the two-pane run before Ctrl+Up was replaced, not kept as branches: one comparison, three replies
        assert app.store.db.execute("SELECT count(*) FROM comparisons").fetchone()[0] == 1
        assert len(app.store.siblings(ids[0])) == 4   # the chat's reply and the three candidates
        assert all(app.store.reply_tokens(i)["tokens"] for i in ids)   # the inspector opens on any of them
        rank = app.screen.query_one("#rank", Input)
        labels = [str(label.render())[:1] for label in app.screen.query(".pane-title")]
        assert labels == ["A", "B", "C"]   # ranking names panes as their titles do
        rank.value = "2 1=3"
        rank.focus()
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert isinstance(app.screen, CompareScreen) and not app.store.preference_pairs()   # refused
        rank.value = "B a=c"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        pairs = {(p["chosen_id"], p["rejected_id"]) for p in app.store.preference_pairs()}
        assert pairs == {(ids[1], ids[0]), (ids[1], ids[2])}
        conversation = app.store.conversations()[0]["id"]
        assert app.store.conversation(conversation)["current_leaf"] == ids[1]   # the best continues



async def rerun_second_pane(pilot, overrides: str) -> list[dict]:
    """Open compare, give pane B `overrides` and run again; the new comparison's candidates, once
    every one is complete."""
    app = pilot.app
    await open_compare(pilot, max_new_tokens=4)
    first = app.screen.comparison_id
    box = app.screen.query_one("#pane-settings-1", Input)
    box.value = overrides
    box.focus()
    await pilot.press("enter")
    await until(pilot, lambda: app.screen.comparison_id not in (None, first) and app.screen.replies is None)
    candidates = app.store.comparison(app.screen.comparison_id)["candidates"]
    await until(pilot, lambda: all(app.store.message(m["id"])["status"] == "complete" for m in candidates))
    return candidates

@sync
async def test_a_compare_pane_can_run_another_model(app, checkpoints):
    other, _ = checkpoints("llama_gqa_untied")
    async with app.run_test(size=(200, 50)) as pilot:
        candidates = await rerun_second_pane(pilot, f"model={other} temperature=0")
        assert [m["model"] for m in candidates] == [app.model_name, str(other)]
        labels = [str(label.render()) for label in app.screen.query(".pane-title")]
        assert str(other) in labels[1] and app.model_name in labels[0]


@sync
async def test_a_bert_pane_fills_masks_and_says_so(app, tmp_path):
    path = make_bert(tmp_path / "bert", Path(app.model_name))
    async with app.run_test(size=(200, 50)) as pilot:
        candidates = await rerun_second_pane(pilot, f"model={path} repetition_penalty=1.3")
        causal, filled = (app.store.message(m["id"]) for m in candidates)
        assert filled["model"] == str(path) and filled["finish_reason"] == "length"
        tokens = app.store.reply_tokens(filled["id"])["tokens"]
        assert len(tokens) == 4   # the pane's max_new_tokens, all filled, kept in the reply's order (not the fill's)
        assert Tokenizer.from_dir(path).decode([t["token_id"] for t in tokens]) == filled["content"]
        assert "_" not in filled["content"] and filled["content"] == app.screen.views[filled["id"]].message["content"]
        labels = [str(label.render()) for label in app.screen.query(".pane-title")]
        assert "mask filling (BERT); not used: repetition_penalty" in labels[1]
        assert "mask filling" not in labels[0] and app.model_name in labels[0]
        rank = app.screen.query_one("#rank", Input)
        rank.value = "b a"
        rank.focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        assert {(p["chosen_id"], p["rejected_id"]) for p in app.store.preference_pairs()} == {(filled["id"], causal["id"])}


def status(app):
    return str(app.screen.query_one("#status").render())


@sync
async def test_status_line_says_when_the_model_is_ready(app, tmp_path):
    async with app.run_test(size=(160, 50)) as pilot:
        await until(pilot, lambda: status(app).startswith("ready: "))
        app.switch_model(str(tmp_path / "missing"))
        await until(pilot, lambda: status(app).startswith("no model: "))


@sync
async def test_message_sent_before_the_model_loads_waits(app):
    app.model_ready.clear()
    original = app.load_model
    app.load_model = lambda: None   # hold the model back
    async with app.run_test(size=(160, 50)) as pilot:
        set_setting(app.screen, "max_new_tokens", 3)
        await send(pilot, "Are you there?")
        await pilot.pause(0.3)
        assert "waiting for the model" in status(app)
        assert replies(app.store) == []
        original()
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
        await until(pilot, lambda: "tokens" in status(app))   # the UI has had the reply's last event


@sync
async def test_reply_events_after_quitting_are_dropped_and_others_raise(app):
    from textual.css.query import NoMatches

    from tui_app.screens.replies import while_shown

    @while_shown
    async def handler(screen, message):   # what a reply handler meets once the screen's widgets are gone
        raise NoMatches("#status")

    async with app.run_test(size=(160, 50)):
        screen = app.screen
        with pytest.raises(NoMatches):   # on a screen still shown, a missing widget is a bug
            await handler(screen, None)
    await handler(screen, None)   # the app has quit: the event has nowhere to go


@sync
async def test_token_inspector_shows_the_engines_values_for_any_reply_and_continues_from_an_alternative(app):
    from textual.widgets import DataTable

    import engine
    from engine.generate import Generation, Token
    from engine.settings import Settings
    from tui_app.screens import InspectorScreen
    async with app.run_test(size=(160, 50)) as pilot:
        set_setting(app.screen, "max_new_tokens", 6)
        set_setting(app.screen, "top_k", 3)
        await reply_to(pilot, "Hello", 1)
    source = replies(app.store)[0]
    # a later session: the reply was generated before this app started, and is inspected all the same
    app = ParleyApp(model=app.model_name, store=app.store, device="cpu")
    async with app.run_test(size=(160, 50)) as pilot:
        chat = app.screen
        await chat.open_conversation(source["conversation_id"])
        await until(pilot, lambda: app.lm is not None)
        await pilot.press("f9")
        await until(pilot, lambda: isinstance(app.screen, InspectorScreen))
        await pilot.press("down")
        await pilot.pause(0.1)
        info = str(app.screen.query_one("#token-info").render())
        table = app.screen.query_one("#alternatives", DataTable)
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        # the engine's own numbers for this reply's second token
        lm = engine.load(app.model_name, device="cpu")
        prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
        events = [e for e in Generation(lm, prompt, [Settings.from_dict(source["settings"])]) if isinstance(e, Token)]
        second = events[1]
        assert f"token 1: {second.piece!r} (id {second.token_id})" in info
        after = {a.token_id: a.prob for a in second.top_after}
        assert len(after) == 3                      # top-k 3: the filtered ones are not listed as 0
        for row, before in zip(rows, second.top_before):
            assert row[0] == repr(before.text) and abs(float(row[1]) - before.prob) < 1e-4
            assert (row[2] == "—") == (before.token_id not in after)
            if before.token_id in after:
                assert abs(float(row[2]) - after[before.token_id]) < 1e-4
        other = next(a for a in second.top_after if a.token_id != second.token_id)
        table.focus()
        table.move_cursor(row=[r[0] for r in rows].index(repr(other.text)))
        await pilot.press("enter")                  # a new branch that takes `other` at token 1
        await until(pilot, lambda: app.screen is chat and len(replies(app.store)) == 2
                    and replies(app.store)[1]["status"] == "complete")
        branch = replies(app.store)[1]
        tokens = app.store.reply_tokens(branch["id"])["tokens"]
        assert branch["parent_id"] == source["parent_id"]
        assert [t["token_id"] for t in tokens[:2]] == [events[0].token_id, other.token_id]
        # the text is the bytes of all its tokens decoded together: a first token that is half a
        # UTF-8 character streams as '' and still joins the next one's bytes
        assert branch["content"] == lm.tokenizer.decode([t["token_id"] for t in tokens])
        assert app.store.conversation(source["conversation_id"])["current_leaf"] == branch["id"]
        await pilot.pause(0.2)
        assert "‹ 2/2 ›" in str(chat.views[branch["id"]].query_one(Label).render())


@sync
async def test_models_screen_adds_a_valid_directory_and_refuses_a_bad_one(app, checkpoints, tmp_path):
    from tui_app.screens import ModelsScreen
    good, _ = checkpoints("gpt2")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "bert"}')
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        box = app.screen.query_one("#add-model", Input)
        box.value = f"broken {tmp_path / 'broken'}"
        box.focus()
        await pilot.press("enter")
        await pilot.pause(1.0)
        assert app.store.model("broken") is None
        box.value = f"tiny-gpt2 {good}"
        await pilot.press("enter")
        await until(pilot, lambda: app.store.model("tiny-gpt2") is not None)
        await until(pilot, lambda: len(app.screen.query("#model-list ListItem")) >= 1)
        models = app.screen.query_one("#model-list")
        models.focus()
        models.index = [item.name for item in models.query("ListItem")].index("tiny-gpt2")
        await pilot.pause(0.1)
        await pilot.press("enter")
        await until(pilot, lambda: app.model_name == "tiny-gpt2" and app.model_ready.is_set() and app.lm is not None)
        assert app.store.preference("last_model") == "tiny-gpt2"


@sync
async def test_key_bindings_can_be_remapped_in_config(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('[keys]\nregenerate = "f12"\n')
    path, _ = checkpoints("qwen2")
    app = ParleyApp(model=str(path), device="cpu")
    async with app.run_test(size=(160, 50)) as pilot:
        set_setting(app.screen, "max_new_tokens", 3)
        await send(pilot, "Hello")
        await until(pilot, lambda: len(replies(app.store)) == 1 and replies(app.store)[0]["status"] == "complete")
        await pilot.press("ctrl+r")   # no longer bound
        await pilot.pause(0.5)
        assert len(replies(app.store)) == 1
        await pilot.press("f12")
        await until(pilot, lambda: len(replies(app.store)) == 2)


@pytest.mark.parametrize("line, problem", [
    ('regenerate = 7', 'regenerate = 7 is not a string'),
    ('regenerate = "ctrl+shoe"', '"ctrl+shoe" is not a key name'),
    ('regenerate = "f12"\ncompare = "f12"', 'line 3: "f12" is already the key of compare'),
    ('regenerate = "ctrl+o"', '"ctrl+o" is already the key of compare'),   # compare would be lost
    ('regnerate = "f12"', "'regnerate' is not an action"),
])
def test_a_bad_key_remap_stops_the_start_with_one_line_naming_the_config_line(tmp_path, monkeypatch, capsys,
                                                                             line, problem):
    from tui_app.main import main
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path))
    monkeypatch.setattr(ParleyApp, "run", lambda self: pytest.fail("the app started with a bad remap"))
    (tmp_path / "config.toml").write_text('system_prompt = "hi"\n[keys]\n' + line + "\n")
    with pytest.raises(SystemExit) as exit:
        main([])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 1 and "\n" not in err and "Traceback" not in err, err
    assert problem in err and "config.toml line 3:" in err, err


@sync
async def test_training_run_started_from_the_dashboard_shows_progress(app, tmp_path):
    import json

    from engine.train.tokenizer import train_tokenizer
    from tui_app.screens import TrainingScreen
    conversations = [{"messages": [{"role": "user", "content": f"hello {i}"},
                                   {"role": "assistant", "content": "hi there, friend!"}]} for i in range(80)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    train_tokenizer([c["messages"] for c in conversations], 300).save(tmp_path / "tok")
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("ctrl+b")
        await until(pilot, lambda: isinstance(app.screen, TrainingScreen))
        box = app.screen.query_one("#start-run", Input)
        command = (f"train pretrain --preset tiny --tokenizer {tmp_path / 'tok'} --data {tmp_path / 'chat.jsonl'} "
                     f"--out {tmp_path / 'trained'} --max-steps 8 --batch-size 4 --seq-len 16 --eval-every 4 "
                     f"--save-every 4 --device cpu")
        box.value = command
        box.focus()
        await pilot.press("enter")
        await until(pilot, lambda: app.store.runs() and app.store.runs()[0]["status"] == "finished", 90)
        await pilot.pause(1.5)
        assert "step 8/8" in str(app.screen.query_one("#runs ListItem Label").render())
        assert {"loss", "eval_loss"} <= set(plotted(app.screen))   # both curves on the loss plot
        assert app.store.model("trained") is not None            # ready in the model picker

        box.value = command.replace("--max-steps 8", "--max-steps 100000").replace("trained", "long")
        box.focus()
        await pilot.press("enter")
        await until(pilot, lambda: app.store.runs()[0]["status"] == "running" and app.store.metrics(app.store.runs()[0]["id"]), 60)
        await pilot.pause(1.5)   # the dashboard refreshes and selects the newest run
        await pilot.press("f8")
        await until(pilot, lambda: app.store.runs()[0]["status"] == "cancelled", 60)
        await until(pilot, lambda: not app.screen.processes, 30)   # both processes ended and were seen
        assert not app.screen.query_one("#run-error").display    # finishing and cancelling are no failures


@sync
async def test_a_run_that_fails_before_it_starts_shows_why_on_the_dashboard(app, tmp_path):
    from tui_app.screens import TrainingScreen
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("ctrl+b")
        await until(pilot, lambda: isinstance(app.screen, TrainingScreen))
        box = app.screen.query_one("#start-run", Input)
        box.value = f"train sft --model no-such-model --out {tmp_path / 'out'} --device cpu"
        box.focus()
        await pilot.press("enter")
        error = app.screen.query_one("#run-error", Static)
        await until(pilot, lambda: error.display, 60)
        shown = str(error.render())
        assert shown.startswith("train sft (pid ") and "no model directory or known model named 'no-such-model'" in shown
        assert not app.store.runs()   # nothing but the log and the dashboard says why
        (log,) = app.store.path.parent.glob("run-*.log")
        assert log.name in shown and "no-such-model" in log.read_text()


@sync
async def test_conversation_settings_and_saved_presets(app):
    from tui_app.screens import ConversationScreen
    async with app.run_test(size=(160, 60)) as pilot:
        set_setting(app.screen, "max_new_tokens", 3)
        set_setting(app.screen, "temperature", 0.42)
        await send(pilot, "Hello")
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
        preset = app.screen.query_one("#save-preset", Input)
        preset.value = "mine"
        preset.focus()
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert app.store.preference("presets")["mine"]["temperature"] == 0.42
        await pilot.press("ctrl+g")
        await until(pilot, lambda: isinstance(app.screen, ConversationScreen))
        app.screen.query_one("#title", Input).value = "Renamed chat"
        app.screen.query_one("#system-prompt").text = "Answer like a pirate."
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        conversation = app.store.conversations()[0]
        assert (conversation["title"], conversation["system_prompt"]) == ("Renamed chat", "Answer like a pirate.")
        assert app.store.prompt_messages(conversation["id"], None)[0] == {"role": "system",
                                                                          "content": "Answer like a pirate."}
    again = ParleyApp(model=app.model_name, store=app.store, device="cpu")
    assert again.presets["mine"]["temperature"] == 0.42


def test_importing_the_app_does_not_import_torch():
    code = "import sys, tui_app.app, tui_app.main; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_the_first_frame_is_drawn_before_torch_is_imported(checkpoints, tmp_path):
    path, _ = checkpoints("qwen2")
    out = subprocess.run([sys.executable, "benchmarks/bench_startup.py", "--child", "--model", str(path)],
                         capture_output=True, text=True, check=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PARLEY_HOME": str(tmp_path)}).stdout
    marks = json.loads(out.strip().splitlines()[-1])
    assert marks["first_frame"][1] is False    # torch not imported when the first frame was drawn
    assert marks["ready"][1] is True           # and the model loaded afterwards
    assert marks["ready"][0] > marks["first_frame"][0]


def test_pane_overrides_parse_and_refuse_nonsense():
    from engine import ParleyError
    from tui_app.screens import parse_overrides
    assert parse_overrides("temperature=0.3 top_k=20") == ({"temperature": 0.3, "top_k": 20}, None)
    assert parse_overrides("model=other top_p=0.5") == ({"top_p": 0.5}, "other")
    with pytest.raises(ParleyError, match="write name=value"):
        parse_overrides("warmth=3")
    with pytest.raises(ParleyError, match="top_k takes a number"):
        parse_overrides("top_k=many")


@sync
async def test_the_store_is_read_and_written_the_same_number_of_times_for_any_reply_length(app, monkeypatch):
    """Per token, a reply costs no store call: the worker posts tokens, the screen appends them
    (the thread is not read again, the finished row not read back). Only the partial reply saved
    every few seconds for a crash (engine.chat.SAVE_EVERY_S) grows with time; it is off here."""
    import collections
    import inspect

    import engine.chat
    monkeypatch.setattr(engine.chat, "SAVE_EVERY_S", 1e9)
    calls = collections.Counter()
    for name, method in inspect.getmembers(Store, inspect.isfunction):
        if not name.startswith("_"):
            def counted(*args, _name=name, _method=method, **kwargs):
                calls[_name] += 1
                return _method(*args, **kwargs)
            monkeypatch.setattr(Store, name, counted)

    async def reply(pilot, tokens):
        calls.clear()
        before = len(replies(app.store))
        set_setting(app.screen, "max_new_tokens", tokens)
        set_setting(app.screen, "min_new_tokens", tokens)   # exactly this long
        await send(pilot, "Tell me more")
        await until(pilot, lambda: len(replies(app.store)) > before and replies(app.store)[-1]["status"] == "complete")
        await pilot.pause(0.3)
        counts = dict(calls)
        assert len(app.store.reply_tokens(replies(app.store)[-1]["id"])["tokens"]) == tokens
        counts.pop("message", None)    # the test's own `replies` reads
        return counts

    async with app.run_test(size=(160, 50)) as pilot:
        await until(pilot, lambda: app.lm is not None)
        await reply(pilot, 4)            # the first reply also creates the conversation
        short = await reply(pilot, 8)
        long = await reply(pilot, 80)
    assert short == long and sum(short.values()) > 0, (short, long)


@sync
async def test_quitting_closes_the_store_so_the_database_is_one_whole_file(app):
    app.store.close()                                      # the fixture's, handed in: not the app's to close
    app = ParleyApp(model=app.model_name, device="cpu")    # opens (and so closes) its own store
    async with app.run_test(size=(160, 50)) as pilot:
        set_setting(app.screen, "max_new_tokens", 4)
        await send(pilot, "Hello there!")
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
    import sqlite3
    with pytest.raises(sqlite3.ProgrammingError):   # closed on quit
        app.store.conn.execute("SELECT 1")
    wal = app.store.path.with_name(app.store.path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "the data was left in the WAL"
    with sqlite3.connect(f"file:{app.store.path}?immutable=1", uri=True) as db:   # reads the main file only
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 2


@sync
async def test_help_lists_every_key_of_the_screen_as_remapped_and_the_palette_runs_them(app):
    from textual.binding import Binding
    from textual.widgets import DataTable

    from tui_app.screens.help import HelpScreen
    app.set_keymap({"compare": "ctrl+k"})
    async with app.run_test(size=(160, 50)) as pilot:
        chat = app.screen
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        table = app.screen.query_one(DataTable)
        shown = {tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)}
        for binding in chat.BINDINGS:
            keys = {key for key, does, name in shown if does == binding.description and name == binding.id}
            assert keys, f"{binding.description} ({binding.id}) is not in the help"
            if binding.action == "compare":
                assert keys == {app.get_key_display(Binding("ctrl+k", "compare"))}   # the remap, not the default
        assert any(does == "Help" for _, does, _ in shown)
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is chat)
        titles = {c.title: c for c in app.get_system_commands(chat)}
        assert {b.description for b in chat.BINDINGS} <= set(titles)
        from tui_app.screens import ModelsScreen
        await titles["Models"].callback()          # the palette runs the action itself
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen))
        await pilot.pause(0.3)
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is chat)
        footer = {b.binding.description for b in chat.active_bindings.values() if b.binding.show}
        assert "Help" in footer and "Models" in footer and "Copy" not in footer


@sync
async def test_new_archive_and_delete_leave_no_old_title_and_templates_do_not_nest(app):
    from engine.settings import TEMPLATES
    async with app.run_test(size=(160, 50)) as pilot:
        screen = app.screen
        set_setting(screen, "max_new_tokens", 3)
        await send(pilot, "Hello there!")
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
        model = Path(app.model_name).name
        assert screen.sub_title == f"Hello there! · {model} answers"
        conversation = app.store.conversations()[0]["id"]
        for key in ("ctrl+n", "f5", "f8"):
            await screen.open_conversation(conversation)
            assert screen.sub_title == f"Hello there! · {model} answers"
            await pilot.press(*([key] * (2 if key == "f8" else 1)))   # F8 asks to be pressed twice
            await pilot.pause(0.2)
            assert screen.sub_title == f"new conversation · {model} answers", key
            if key == "f5":
                app.store.db.execute("UPDATE conversations SET archived = 0")   # back, for F8
        assert not app.store.conversations()
        prompt = screen.query_one(PromptArea)
        prompt.focus()
        prompt.text = "why is the sky blue?"
        names = list(TEMPLATES)
        for i in range(len(names) + 1):
            await pilot.press("ctrl+t")
            assert prompt.text == TEMPLATES[names[i % len(names)]].replace("{question}", "why is the sky blue?")


@sync
async def test_the_models_list_opens_on_the_current_model_and_a_pick_stays_the_conversations(app, checkpoints):
    from textual.widgets import ListView

    from tui_app.screens import ModelsScreen
    app.store.add_model("first", str(checkpoints("qwen2")[0]))
    app.store.add_model("second", str(checkpoints("llama_gqa_untied")[0]))
    app = ParleyApp(model="first", store=app.store, device="cpu")
    async with app.run_test(size=(160, 50)) as pilot:
        chat = app.screen
        set_setting(chat, "max_new_tokens", 3)
        await send(pilot, "Hello")
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(app.screen, ModelsScreen) and app.screen.query_one(ListView).children)
        await pilot.pause(0.2)
        view = app.screen.query_one(ListView)
        assert view.highlighted_child.name == "first"
        while view.highlighted_child.name != "second":
            await pilot.press("down")
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is chat and app.lm is not None and app.model_name == "second")
        assert app.store.conversation(chat.conversation_id)["model"] == "second"
        await send(pilot, "And now?")
        await until(pilot, lambda: len(replies(app.store)) == 2 and replies(app.store)[1]["status"] == "complete")
        assert app.model_name == "second" and replies(app.store)[1]["model"] == "second"


async def reply_to(pilot, text, count):
    """Send `text` and wait until the store holds `count` complete replies."""
    await send(pilot, text)
    await until(pilot, lambda: len(replies(pilot.app.store)) == count
                and all(r["status"] == "complete" for r in replies(pilot.app.store)))
    await pilot.pause(0.1)


@sync
async def test_any_message_takes_focus_and_switches_its_own_branches_and_the_tree_shows_them_all(app):
    from textual.widgets import Tree

    from tui_app.screens import TreeScreen
    async with app.run_test(size=(160, 50)) as pilot:
        chat = app.screen
        set_setting(chat, "max_new_tokens", 3)
        await reply_to(pilot, "Hello", 1)
        await pilot.press("f3")   # edit the first message: a second branch at the root
        await reply_to(pilot, "Hi again", 2)
        conversation = chat.conversation_id
        first_user, second_user = app.store.children(conversation, None)
        first_reply, second_reply = replies(app.store)
        await pilot.press("shift+tab")             # from the prompt to the thread: its last message
        assert app.focused is chat.views[second_reply["id"]]
        await pilot.press("up")                    # to the earlier message, whose siblings are switched
        assert app.focused is chat.views[second_user["id"]]
        await pilot.press("alt+left")
        await until(pilot, lambda: app.store.conversation(conversation)["current_leaf"] == first_reply["id"])
        assert app.focused is chat.views[first_user["id"]]   # the sibling keeps the focus
        assert "‹ 1/2 ›" in str(chat.views[first_user["id"]].query_one(Label).render())

        await pilot.press("alt+t")
        await until(pilot, lambda: isinstance(app.screen, TreeScreen))
        tree = app.screen.query_one(Tree)
        nodes = {}
        stack = [tree.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.data:
                nodes[node.data] = str(node.label)
        assert set(nodes) == {first_user["id"], second_user["id"], first_reply["id"], second_reply["id"]}
        assert app.model_name in nodes[second_reply["id"]] and "temperature=" in nodes[second_reply["id"]]
        assert nodes[first_user["id"]].startswith("● user: Hello")     # the path shown
        assert nodes[second_user["id"]].startswith("○ user: Hi again")
        assert tree.cursor_node.data == first_user["id"]              # opens on the focused message
        tree.move_cursor(next(n for n in tree.root.children if n.data == second_user["id"]))
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is chat)
        assert app.store.conversation(conversation)["current_leaf"] == second_reply["id"]
        assert app.focused is chat.views[second_user["id"]]


@sync
async def test_tab_moves_between_regions_and_arrows_within_them(app):
    from textual.widgets import ListView, Select

    from tui_app.widgets import SettingsPanel
    async with app.run_test(size=(160, 50)) as pilot:
        chat = app.screen
        set_setting(chat, "max_new_tokens", 3)
        await reply_to(pilot, "Hello", 1)
        panel = chat.query_one(SettingsPanel)
        stops = []
        for _ in range(5):
            await pilot.press("tab")
            stops.append(app.focused)
        assert stops[0] in panel.fields() and stops[4] is chat.query_one(PromptArea)   # one stop per region
        assert stops[1:4] == [chat.query_one("#search"), chat.query_one("#conversations"),
                              chat.views[replies(app.store)[0]["id"]]]
        assert chat.query_one("#conversations", ListView).index == 0   # the list has a highlighted row
        await pilot.press("tab")
        first = app.focused
        await pilot.press("down", "down")
        assert app.focused is panel.fields()[2] and isinstance(first, Select)
        await pilot.press("f2")                    # hiding the panel with the focus in it
        assert not panel.display and app.focused is chat.query_one(PromptArea)


@sync
async def test_archived_conversations_can_be_listed_opened_and_restored(app):
    from textual.widgets import ListView
    async with app.run_test(size=(160, 50)) as pilot:
        chat = app.screen
        set_setting(chat, "max_new_tokens", 3)
        await reply_to(pilot, "Keep me for later", 1)
        conversation = chat.conversation_id
        await pilot.press("f5")
        await pilot.pause(0.2)
        view = chat.query_one("#conversations", ListView)
        assert not view.children
        await pilot.press("alt+a")
        await pilot.pause(0.2)
        assert [item.name for item in view.children] == [conversation] and app.focused is view
        await pilot.press("enter")
        await until(pilot, lambda: chat.conversation_id == conversation and chat.views)
        await pilot.press("f5")                    # in the archived list, F5 restores
        await pilot.press("alt+a")
        await pilot.pause(0.2)
        assert [item.name for item in view.children] == [conversation]
        assert not app.store.conversation(conversation)["archived"]


@sync
async def test_a_search_result_shows_its_whole_snippet(app):
    async with app.run_test(size=(160, 50)) as pilot:
        chat = app.screen
        set_setting(chat, "max_new_tokens", 2)
        await reply_to(pilot, "the quick brown fox jumps over the lazy dog near the riverbank at dawn", 1)
        search = chat.query_one("#search", Input)
        search.focus()
        search.value = "riverbank"
        await pilot.press("enter")
        await pilot.pause(0.3)
        label = chat.query_one("#conversations ListItem Label", Label)
        snippet = app.store.search("riverbank")[0]["snippet"]
        assert len(snippet) > 29 and snippet in str(label.render())
        assert label.size.height >= 2 and label.size.width <= chat.query_one("#sidebar").size.width


@sync
async def test_keys_typed_while_the_app_starts_go_to_the_prompt(app):
    for i in range(300):   # a long list to read and show at the start: keys arrive before that is done
        app.store.create_conversation(f"conversation {i}")
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("h", "i")
        await pilot.pause(0.2)
        assert app.screen.query_one(PromptArea).text == "hi" and app.screen.query_one("#search", Input).value == ""


def rank_presets(store, wins):
    """Comparisons of two replies through the store's API: `wins` of (winner, loser) with each a
    (temperature, model) preset."""
    c = store.create_conversation("arena")
    u = store.add_message(c, "user", "Hi")
    for winner, loser in wins:
        ids = [store.add_message(c, "assistant", "x", u, model=m, settings=Settings(temperature=t).to_dict(),
                                 make_current=False) for t, m in (winner, loser)]
        store.vote(store.create_comparison(c, u, ids), "best", best=ids[0])


@sync
async def test_arena_shows_the_ratings_and_uses_the_best_preset(app, checkpoints):
    from textual.widgets import DataTable
    from textual_plotext import PlotextPlot

    from engine.arena import ratings
    from tui_app.screens import ArenaScreen
    other, _ = checkpoints("llama_gqa_untied")
    model = app.model_name
    best, middle, worst = (0.4, str(other)), (0.9, model), (1.5, model)
    rank_presets(app.store, [(best, middle)] * 3 + [(middle, best), (middle, worst)] * 2
                 + [(best, worst)] * 2 + [(worst, middle)])
    async with app.run_test(size=(160, 50)) as pilot:
        await until(pilot, lambda: app.lm is not None)
        await pilot.press("alt+r")
        await until(pilot, lambda: isinstance(app.screen, ArenaScreen) and app.screen.rows)
        table = app.screen.query_one(DataTable)
        rows = [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]
        expected = ratings(app.store)
        assert [row[1] for row in rows] == [f"temperature=0.4 @ {other}", f"temperature=0.9 @ {model}",
                                            f"temperature=1.5 @ {model}"] == [r.preset.label for r in expected]
        assert [row[2] for row in rows] == [f"{r.rating:.0f}" for r in expected]
        assert rows[0][3] == f"{expected[0].low:.0f} to {expected[0].high:.0f}" and rows[0][4:] == ["7", "71%"]
        assert "95% interval" in str(app.screen.query_one(PlotextPlot).render())
        await pilot.press("b")   # presets by settings alone
        await until(pilot, lambda: app.screen.rows and app.screen.rows[0].preset.model is None)
        assert [str(table.get_row_at(i)[1]) for i in range(table.row_count)] == [
            "temperature=0.4", "temperature=0.9", "temperature=1.5"]
        await pilot.press("b", "b")   # by model, then back to both
        await until(pilot, lambda: app.screen.rows and app.screen.by == "both" and app.screen.rows[0].preset.model)
        await pilot.press("u")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        await until(pilot, lambda: app.settings.temperature == 0.4 and app.model_name == str(other))
        assert app.screen.query_one("#set-temperature", Input).value == "0.4"
        await until(pilot, lambda: app.lm is not None)   # the preset's model loaded


@sync
async def test_arena_on_an_empty_store_says_so(app):
    from tui_app.screens import ArenaScreen
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("alt+r")
        await until(pilot, lambda: isinstance(app.screen, ArenaScreen)
                    and "no battles yet" in str(app.screen.query_one("#arena-note").render()))
        await pilot.press("u")   # nothing to use: the screen stays
        await pilot.pause(0.1)
        assert isinstance(app.screen, ArenaScreen) and app.settings.temperature == 0.8
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))


def pane_titles(screen):
    return [str(label.render()) for label in screen.query(".pane-title")]


@sync
async def test_blind_compare_hides_and_shuffles_the_panes_settings_until_ranked(app):
    import random

    from engine.arena import battles
    async with app.run_test(size=(200, 50)) as pilot:
        await open_compare(pilot, max_new_tokens=4)
        screen = app.screen
        first = screen.comparison_id
        assert "temperature 0.3" in pane_titles(screen)[0]   # not blind: pane A runs slot A
        screen.rng = random.Random(0)   # shuffles two panes as [1, 0]: pane A runs what slot B would
        await pilot.press("alt+b")
        await until(pilot, lambda: screen.comparison_id not in (None, first) and screen.replies is None)
        assert app.store.preference("blind_compare") is True
        assert pane_titles(screen) == ["A  (blind: shown once ranked)", "B  (blind: shown once ranked)"]
        assert not any(box.display for box in screen.query(".pane-settings"))
        ids = screen.message_ids
        candidates = app.store.comparison(screen.comparison_id)["candidates"]
        assert [m["id"] for m in candidates] == ids
        assert [m["settings"]["temperature"] for m in candidates] == [0.7, 0.3]   # shuffled
        rank = screen.query_one("#rank", Input)
        rank.value = "b a"
        rank.focus()
        await pilot.press("enter")
        await until(pilot, lambda: screen.ranked == ids[1])
        assert isinstance(app.screen, CompareScreen)   # it stays, to show which pane ran what
        titles = pane_titles(screen)
        assert "temperature 0.7" in titles[0] and "temperature 0.3" in titles[1] and app.model_name in titles[1]
        assert all(box.display for box in screen.query(".pane-settings"))
        # stored as any ranking: one ranking of the comparison, the pair, the battle
        assert [r["ranks"] for r in app.store.rankings()] == [{ids[0]: 2, ids[1]: 1}]
        assert [(p["chosen_id"], p["rejected_id"]) for p in app.store.preference_pairs()] == [(ids[1], ids[0])]
        assert [(b.a.label, b.score) for b in battles(app.store, "settings")] == [("max_new_tokens=4 temperature=0.7", 0.0)]
        rank.value = "a b"
        await pilot.press("enter")   # no second ranking of the same battle
        await pilot.pause(0.1)
        assert len(app.store.rankings()) == 1
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        assert app.store.conversation(app.store.conversations()[0]["id"])["current_leaf"] == ids[1]
        await pilot.press("ctrl+o")   # blind mode is remembered
        await until(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.titles)
        assert pane_titles(app.screen)[0] == "A  (blind: shown once ranked)"
        await until(pilot, lambda: app.screen.comparison_id and app.screen.replies is None)


@sync
async def test_arena_shows_preset_labels_as_text(app):
    from tui_app.screens import ArenaScreen
    odd = "[b]odd[/b]"
    rank_presets(app.store, [((0.4, odd), (0.9, odd))] * 2 + [((0.9, odd), (0.4, odd))])
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("alt+r")
        await until(pilot, lambda: isinstance(app.screen, ArenaScreen) and app.screen.rows)
        shot = app.export_screenshot()
        assert "temperature=0.4&#160;@&#160;[b]odd[/b]" in shot and "temperature=0.9&#160;@&#160;[b]odd[/b]" in shot


# -- the reward model in the loop -----------------------------------------------------------------
@pytest.fixture
def reward_app(checkpoints, tmp_path, monkeypatch):
    """The app on the tiny model with a tiny reward model (random head) chosen by --reward-model."""
    from helpers import make_reward_model
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    path, _ = checkpoints("qwen2")
    rm = make_reward_model(path, tmp_path / "rm")
    return ParleyApp(model=str(path), store=Store(), device="cpu", reward_model=str(tmp_path / "rm")), rm


def rewards_of(rm, store, ids):
    """The reward model's scores of stored replies, computed here one by one: the reference."""
    out = []
    for i in ids:
        m = store.message(i)
        out.append(rm.rewards([(store.prompt_messages(m["conversation_id"], m["parent_id"]), m["content"])])[0])
    return out


@sync
async def test_compare_panes_show_the_reward_models_score_of_each_candidate(reward_app, tmp_path):
    app, rm = reward_app
    async with app.run_test(size=(200, 50)) as pilot:
        await open_compare(pilot, max_new_tokens=5)
        # every pane's score, not just the first to arrive (each comes in a Message of its own)
        await until(pilot, lambda: app.screen.scores and set(app.screen.scores) == set(app.screen.message_ids))
        ids = app.screen.message_ids
        expected = rewards_of(rm, app.store, ids)
        assert len(set(expected)) == len(expected)   # the head's spread tells the candidates apart
        labels = [str(label.render()) for label in app.screen.query(".pane-score")]
        assert labels == [f"reward {s:+.3f}" for s in expected]
        recorded = app.store.scores(app.reward_model_name, ids)
        assert [recorded[i] for i in ids] == pytest.approx(expected, abs=1e-4)
        # blind mode hides the scores with the settings until the comparison is ranked
        await pilot.press("alt+b")
        await until(pilot, lambda: app.screen.scores and set(app.screen.scores) == set(app.screen.message_ids))
        labels = [str(label.render()) for label in app.screen.query(".pane-score")]
        assert labels == ["reward: shown once ranked"] * 2
        rank = app.screen.query_one("#rank", Input)
        rank.value = "a"
        rank.focus()
        await pilot.press("enter")
        expected = rewards_of(rm, app.store, app.screen.message_ids)
        await until(pilot, lambda: [str(label.render()) for label in app.screen.query(".pane-score")]
                    == [f"reward {s:+.3f}" for s in expected])
    # the choice is remembered: the next start scores with it without --reward-model
    assert app.store.preference("reward_model") == str((tmp_path / "rm").resolve())
    assert ParleyApp(model=app.model_name, store=app.store).reward_model_name == str((tmp_path / "rm").resolve())


@sync
async def test_the_models_screen_chooses_a_reward_model_and_refuses_a_model_that_is_none(app, checkpoints, tmp_path):
    from helpers import make_reward_model
    make_reward_model(checkpoints("qwen2")[0], tmp_path / "rm")
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("ctrl+l")
        await pilot.pause(0.2)
        box = app.screen.query_one("#reward-model", Input)
        box.value = str(checkpoints("qwen2")[0])   # a chat model, not a reward model
        box.focus()
        await pilot.press("enter")
        await until(pilot, lambda: any("not a reward model" in n.message for n in app._notifications))
        assert app.reward_model_name is None
        box.value = str(tmp_path / "rm")
        await pilot.press("enter")
        await until(pilot, lambda: app.reward_model_name is not None)
        assert app.reward_model_name == str((tmp_path / "rm").resolve()) and app.rm is not None
        assert app.store.preference("reward_model") == app.reward_model_name
        assert app.reward_model_name in str(app.screen.query_one("#reward-model-now", Label).render())


@sync
async def test_best_of_n_shows_the_highest_scored_reply_and_keeps_the_others_as_scored_siblings(reward_app):
    app, rm = reward_app
    async with app.run_test(size=(160, 50)) as pilot:
        screen = app.screen
        set_setting(screen, "max_new_tokens", 6)
        set_setting(screen, "seed", 5)
        await pilot.press("alt+n", "alt+n")   # 1 -> 2 -> 4
        assert app.best_of == 4 and app.store.preference("best_of") == 4
        await send(pilot, "Hello there!")
        await until(pilot, lambda: len(replies(app.store)) == 4 and screen.best_of_ids is None
                    and not screen.streaming and screen.views)
        await pilot.pause(0.2)
        candidates = replies(app.store)
        ids = [m["id"] for m in candidates]
        assert [m["settings"]["seed"] for m in candidates] == [5, 6, 7, 8]   # one batched run, a seed each
        assert app.store.db.execute("SELECT count(*) FROM comparisons").fetchone()[0] == 1
        expected = rewards_of(rm, app.store, ids)
        assert len(set(expected)) == 4
        best = ids[max(range(4), key=expected.__getitem__)]
        conversation = app.store.conversations()[0]["id"]
        assert app.store.conversation(conversation)["current_leaf"] == best
        assert [m for m, v in screen.views.items() if v.message["role"] == "assistant"] == [best]
        assert {s["id"] for s in app.store.siblings(best)} == set(ids)
        recorded = app.store.scores(app.reward_model_name, ids)
        assert [recorded[i] for i in ids] == pytest.approx(expected, abs=1e-4)
        role = str(screen.views[best].query_one(".role", Label).render())
        assert f"reward {max(expected):+.3f}" in role and "/4 ›" in role
        assert f"best of 4 by the reward model: {max(expected):+.3f}" in str(screen.query_one("#status").render())
        # Alt+← / Alt+→ reach the others, each with its own score
        index = [s["id"] for s in app.store.siblings(best)].index(best)
        await pilot.press("alt+left" if index else "alt+right")
        await pilot.pause(0.3)
        other = next(m for m, v in screen.views.items() if v.message["role"] == "assistant")
        assert other != best and other in ids
        assert f"reward {expected[ids.index(other)]:+.3f}" in str(screen.views[other].query_one(".role", Label).render())


@sync
async def test_best_of_n_without_a_reward_model_says_so_and_gives_one_reply(app):
    async with app.run_test(size=(160, 50)) as pilot:
        set_setting(app.screen, "max_new_tokens", 3)
        await pilot.press("alt+n")
        await send(pilot, "Hello there!")
        await until(pilot, lambda: replies(app.store) and replies(app.store)[0]["status"] == "complete")
        await pilot.pause(0.2)
        assert len(replies(app.store)) == 1
        assert any("needs a reward model" in n.message for n in app._notifications)


@sync
async def test_arena_shows_the_reward_models_agreement_with_the_rankings(reward_app):
    from tui_app.screens import ArenaScreen
    app, rm = reward_app
    c = app.store.create_conversation("arena")
    u = app.store.add_message(c, "user", "What should I drink?")
    texts = [("Tea is nice today.", "Maybe a cup of juice?"), ("I would have some water.", "Hello there!"),
             ("The quick brown fox.", "Tea."), ("Milk, please.", "Soda is nice today.")]
    for t, (winner, loser) in enumerate(texts):
        ids = [app.store.add_message(c, "assistant", x, u, model="tiny", settings=Settings(temperature=0.2 + t).to_dict(),
                                     make_current=False) for x in (winner, loser)]
        app.store.vote(app.store.create_comparison(c, u, ids), "best", best=ids[0])
    prompt = [{"role": "user", "content": "What should I drink?"}]
    agree = [a > b for a, b in (rm.rewards([(prompt, w), (prompt, lose)]) for w, lose in texts)]
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("alt+r")
        note = lambda: str(app.screen.query_one("#arena-agreement").render())   # noqa: E731
        await until(pilot, lambda: isinstance(app.screen, ArenaScreen) and note().startswith("reward model agrees"))
        assert note().startswith(f"reward model agrees with your rankings on {100 * sum(agree) / 4:.0f}% of pairs")
        assert "4 pairs from 4 rankings" in note() and "not known to be held out" in note()


def test_parley_app_takes_a_reward_model(tmp_path):
    from engine.cli import build_parser
    args = build_parser(app=lambda a: None).parse_args(["app", "--reward-model", str(tmp_path)])
    assert args.reward_model == str(tmp_path)


@sync
async def test_a_bad_reward_model_is_said_once_and_not_remembered(app, tmp_path):
    app.reward_model_name = str(tmp_path / "missing")   # as --reward-model gives it
    async with app.run_test(size=(200, 50)) as pilot:
        await open_compare(pilot, max_new_tokens=3)
        await until(pilot, lambda: any("reward model" in n.message and "missing" in n.message
                                       for n in app._notifications))
        assert app.screen.scores == {} and app.store.preference("reward_model") is None
        assert all(str(label.render()) == "" for label in app.screen.query(".pane-score"))


def plotted(screen):
    """What the dashboard gave plotext: {legend entry: (steps, values)}."""
    from tui_app.curves import RunPlot
    monitor = screen.query_one(RunPlot).plt.monitor
    return {label: (list(x), list(y)) for label, x, y in zip(monitor.label, monitor.x, monitor.y)}


@sync
async def test_the_dashboard_plots_each_metric_family_and_overlays_a_second_run(app):
    from tui_app.screens import TrainingScreen
    store = app.store
    first = store.start_run("dpo", {"out": "/x/first", "max_steps": 3})
    second = store.start_run("rm", {"out": "/x/second", "max_steps": 2})
    for step in (1, 2, 3):
        store.log_metrics(first, step, {"loss": 1.0 / step, "reward_accuracy": 0.5 + step / 10, "margin": step})
    store.log_metrics(first, 3, {"eval_loss": 0.9})
    for step in (1, 2):
        store.log_metrics(second, step, {"loss": 2.0 + step, "accuracy": 0.25 * step})
    async with app.run_test(size=(160, 60)) as pilot:
        await pilot.press("ctrl+b")
        await until(pilot, lambda: isinstance(app.screen, TrainingScreen) and app.screen.selected)
        screen = app.screen
        assert screen.selected == second   # the newest run first
        await pilot.press("down")
        await until(pilot, lambda: screen.selected == first and "eval_loss" in plotted(screen))
        assert plotted(screen) == {"loss": ([1, 2, 3], [1.0, 0.5, 1 / 3]), "eval_loss": ([3], [0.9])}
        await pilot.press("f6")   # reward: the margin
        await until(pilot, lambda: "margin" in plotted(screen))
        assert plotted(screen) == {"margin": ([1, 2, 3], [1.0, 2.0, 3.0])}
        await pilot.press("f6", "f6", "f6", "f6")   # kl, accuracy, other, back to loss
        await until(pilot, lambda: "loss" in plotted(screen))
        await pilot.press("f7")   # overlay the first run, then pick the second
        await pilot.press("up")
        await until(pilot, lambda: screen.selected == second and len(plotted(screen)) == 3)
        assert plotted(screen) == {"loss · rm second": ([1, 2], [3.0, 4.0]),
                                   "loss · dpo first": ([1, 2, 3], [1.0, 0.5, 1 / 3]),
                                   "eval_loss · dpo first": ([3], [0.9])}
        await pilot.press("f6", "f6", "f6")   # accuracy: both runs' accuracies on one plot
        await until(pilot, lambda: "accuracy · rm second" in plotted(screen))
        assert set(plotted(screen)) == {"accuracy · rm second", "reward_accuracy · dpo first"}
        await pilot.press("down", "f7", "up")   # F7 on the overlay run removes it
        await until(pilot, lambda: screen.selected == second and set(plotted(screen)) == {"accuracy"})


def rank_pairs(store, conversation, user, count, model="old"):
    """`count` two-reply comparisons of the user message, each voted: one pair each."""
    for i in range(count):
        ids = [store.add_message(conversation, "assistant", text, user, model=model, make_current=False)
               for text in (f"tea, please {i}", f"no thanks {i}")]
        store.vote(store.create_comparison(conversation, user, ids), "best", best=ids[0])


@sync
async def test_train_on_my_rankings_trains_dpo_registers_the_model_and_compares_it_on_a_held_out_prompt(app):
    from tui_app.rounds import DEFAULTS
    from tui_app.screens import TrainingScreen
    from tui_app.screens.models import lineage_note
    store = app.store
    held = store.create_conversation("not ranked")
    held_prompt = store.add_message(held, "user", "What do you drink?")
    ranked = store.create_conversation("ranked")
    user = store.add_message(ranked, "user", "Hi")   # newer than the held-out prompt: it must be passed over
    rank_pairs(store, ranked, user, 2)
    async with app.run_test(size=(160, 60)) as pilot:
        await until(pilot, lambda: app.lm is not None)
        old = app.model_name
        await pilot.press("ctrl+b")
        await until(pilot, lambda: isinstance(app.screen, TrainingScreen))
        await pilot.press("f9")
        await pilot.pause(0.2)
        said = [n.message for n in app._notifications]
        assert not app.rounds and any(f"at least {DEFAULTS.min_pairs} preference pairs and the store has 2" in m
                                      for m in said)
        rank_pairs(store, ranked, user, 2)
        await pilot.press("f9")
        await until(pilot, lambda: app.rounds)
        assert app.rounds[0].out.name.endswith("-dpo-1")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen), 180)
        screen = app.screen
        (run,) = store.runs()
        assert run["kind"] == "dpo" and run["status"] == "finished" and run["base_model"] == old
        assert run["config"]["prefs"] == "store" and run["config"]["lora_r"] is None   # a tiny model trains fully
        metrics = {m["name"] for m in store.metrics(run["id"])}
        assert {"loss", "reward_accuracy", "eval_reward_accuracy"} <= metrics
        new = store.model_by_name_or_path(run["output_model"])
        assert (new["parent"], new["run_id"]) == (old, run["id"])
        assert lineage_note(store, new["name"]) == f"  ← from {old} · by dpo run {run['id']} (finished)"
        # the old and the new model side by side, on the prompt no trained pair came from
        assert (screen.conversation_id, screen.parent_id) == (held, held_prompt)
        assert screen.models == {0: old, 1: new["name"]}
        await until(pilot, lambda: screen.comparison_id and screen.replies is None, 60)
        candidates = store.comparison(screen.comparison_id)["candidates"]
        assert [(m["model"], m["run_id"]) for m in candidates] == [(old, None), (new["name"], run["id"])]

        # the next round: rank the new model's reply best, chat with it, train from it
        rank = screen.query_one("#rank", Input)
        rank.value = "b"
        rank.focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TrainingScreen))
        assert store.conversation(held)["current_leaf"] == candidates[1]["id"]   # the best continues
        app.switch_model(new["name"])
        await until(pilot, lambda: app.lm is not None and app.model_name == new["name"])
        await pilot.press("f9")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen), 180)
        newest = store.model_by_name_or_path(store.runs()[0]["output_model"])
        assert newest["name"].endswith("-dpo-2") and app.screen.models == {0: new["name"], 1: newest["name"]}
        assert [m["name"] for m in store.lineage(newest["name"])] == [newest["name"], new["name"], old]
        assert store.run(newest["run_id"])["base_model"] == new["name"]
        assert lineage_note(store, newest["name"]).startswith(f"  ← from {new['name']} ← {old} · by dpo run ")
        second = app.screen
        await until(pilot, lambda: second.comparison_id and second.replies is None, 60)
        assert [m["run_id"] for m in store.comparison(second.comparison_id)["candidates"]] == [run["id"],
                                                                                               newest["run_id"]]


@sync
async def test_train_on_my_rankings_from_the_arena_refuses_in_one_line_without_enough_pairs(app):
    from tui_app.screens import ArenaScreen
    c = app.store.create_conversation()
    rank_pairs(app.store, c, app.store.add_message(c, "user", "Hi"), 1)
    async with app.run_test(size=(160, 50)) as pilot:
        await until(pilot, lambda: app.lm is not None)
        await pilot.press("alt+r")
        await until(pilot, lambda: isinstance(app.screen, ArenaScreen))
        await pilot.press("t")
        await until(pilot, lambda: any("needs at least 4 preference pairs and the store has 1: rank 3 more" in n.message
                                       for n in app._notifications))
        assert isinstance(app.screen, ArenaScreen) and not app.rounds and not app.store.runs()
