"""Snapshot tests of the main screens on the shipped model (pytest-textual-snapshot): a change
in what a screen shows fails here; `pytest --snapshot-update` records the new look after review."""
import pytest

from engine.store import Store
from tui_app.app import ParleyApp


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))   # no user config.toml
    store = Store()
    c = store.create_conversation("Markup and branches", "Be brief.")
    u = store.add_message(c, "user", "Is [bold]this[/] bold?")
    store.add_message(c, "assistant", "No: [bold] and [/] are shown as they are, and **Markdown** renders.", u)
    return ParleyApp(model="default", store=store, device="cpu")


def settled(*keys):
    """Before the snapshot: wait on what the screen shows, not on a clock (a busy machine loads
    slower), press the keys, let the workers finish, and take the focus away (a focused widget's
    blinking cursor is drawn or not depending on the moment)."""
    async def run(pilot):
        while not str(pilot.app.screen.query_one("#status").render()).startswith("ready: "):
            await pilot.pause(0.05)
        await pilot.press(*keys)
        await pilot.app.workers.wait_for_complete()
        await pilot.wait_for_scheduled_animations()
        pilot.app.screen.set_focus(None)
        await pilot.pause()
    return run


def test_chat_screen(app, snap_compare):
    assert snap_compare(app, terminal_size=(120, 36), run_before=settled())


def test_models_screen(app, snap_compare):
    assert snap_compare(app, terminal_size=(120, 36), run_before=settled("ctrl+l"))


def test_training_screen(app, snap_compare):
    assert snap_compare(app, terminal_size=(120, 36), run_before=settled("ctrl+b"))
