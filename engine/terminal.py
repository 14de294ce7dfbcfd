"""Text from a model or a user made safe to show on a terminal.

A model can emit any character, and a terminal obeys the control ones: ESC starts sequences that
set the window title, clear the screen or rewrite what was shown (Rich and Textual pass ESC through;
Rich strips only a few others). So everything shown to a person goes through `printable`, which
writes each control character other than newline and tab as a visible escape such as `\\x1b`.
`--json` output and exports keep the exact text (JSON escapes control characters itself).
"""
import re

# C0 controls except tab (\x09) and newline (\x0a), DEL, and the C1 controls (\x9b is a one-byte CSI)
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
