"""The app's screens, one module each."""
from tui_app.screens.arena import ArenaScreen
from tui_app.screens.chat import ChatScreen
from tui_app.screens.compare import CompareScreen, parse_overrides
from tui_app.screens.conversation import ConversationScreen
from tui_app.screens.help import HelpScreen
from tui_app.screens.inspector import InspectorScreen
from tui_app.screens.models import ModelsScreen
from tui_app.screens.training import TrainingScreen
from tui_app.screens.tree import TreeScreen

SCREENS = [ArenaScreen, ChatScreen, CompareScreen, ConversationScreen, HelpScreen, InspectorScreen, ModelsScreen, TrainingScreen,
           TreeScreen]

__all__ = ["SCREENS", "ArenaScreen", "ChatScreen", "CompareScreen", "ConversationScreen", "HelpScreen", "InspectorScreen",
           "ModelsScreen", "TrainingScreen", "TreeScreen", "parse_overrides"]
