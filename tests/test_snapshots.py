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


async def loaded(pilot):
    """Wait on what the screen shows, not on a clock: a busy machine takes longer to load."""
    while not str(pilot.app.screen.query_one("#status").render()).startswith("ready: "):
        await pilot.pause(0.05)
    for widget in pilot.app.screen.query("Input, TextArea"):
        widget.cursor_blink = False   # a blinking cursor is drawn or not depending on the moment
    await pilot.app.workers.wait_for_complete()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def test_chat_screen(app, snap_compare):
    assert snap_compare(app, terminal_size=(120, 36), run_before=loaded)


def test_models_screen(app, snap_compare):
    assert snap_compare(app, terminal_size=(120, 36), press=["ctrl+l"], run_before=loaded)


def test_training_screen(app, snap_compare):
    assert snap_compare(app, terminal_size=(120, 36), press=["ctrl+b"], run_before=loaded)
