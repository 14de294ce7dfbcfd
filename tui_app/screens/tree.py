"""The conversation tree (Alt+T): every branch of every message, with its model and settings."""
from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Label, Tree

from engine.store import Store
from engine.terminal import printable


def node_label(message: dict, on_path: bool) -> Text:
    """One line per message: role, the start of its text, and for replies the model and settings.
    A Rich Text, so the message's own text is never read as markup."""
    text = " ".join(message["content"].split())
    parts = [f"{'●' if on_path else '○'} {message['role']}: {text[:60]}{'…' if len(text) > 60 else ''}"]
    if message["role"] == "assistant":
        s = message.get("settings") or {}
        knobs = " ".join(f"{k}={s[k]}" for k in ("temperature", "top_k", "top_p", "seed") if s.get(k) is not None)
        parts.append(f"{message['model'] or '?'}  {knobs}")
        if message.get("finish_reason") not in (None, "eos"):
            parts.append(f"[{message['finish_reason']}]")
    return Text(printable("   ".join(parts)))


class TreeScreen(ModalScreen):
    """The conversation as a tree; Enter opens the path through the selected message (its newest
    continuation), as the branch keys would after many presses."""

    BINDINGS = [Binding("escape", "dismiss", "Close", id="dismiss")]
    DEFAULT_CSS = """
    TreeScreen { align: center middle; }
    #tree-box { width: 90%; height: 85%; border: solid $primary; background: $surface; }
    """

    def __init__(self, store: Store, conversation_id: str, focused_id: str | None = None):
        super().__init__()
        self.store, self.conversation_id, self.focused_id = store, conversation_id, focused_id

    def compose(self):
        conversation = self.store.conversation(self.conversation_id)
        yield Label("Every branch (● the one shown). Enter opens it, Esc closes.", markup=False)
        tree = Tree(Text(printable(conversation["title"] or "untitled")), id="tree-box")
        tree.show_root = True
        yield tree

    def on_mount(self) -> None:
        tree = self.query_one(Tree)
        thread = self.store.thread(self.conversation_id)
        path = {m["id"] for m in thread}
        start = self.focused_id or (thread[-1]["id"] if thread else None)   # the cursor opens here
        cursor = None
        stack = [(tree.root, None)]
        while stack:   # depth first, children oldest first, as the branch markers count them
            parent, parent_id = stack.pop()
            for message in self.store.children(self.conversation_id, parent_id):
                node = parent.add(node_label(message, message["id"] in path), data=message["id"], expand=True)
                if message["id"] == start:
                    cursor = node
                stack.append((node, message["id"]))
        tree.root.expand_all()
        tree.focus()
        if cursor is not None:
            self.call_after_refresh(tree.move_cursor, cursor)

    @on(Tree.NodeSelected)
    def open_branch(self, event: Tree.NodeSelected) -> None:
        if event.node.data is not None:
            self.dismiss(event.node.data)
