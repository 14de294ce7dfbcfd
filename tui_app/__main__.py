"""`python -m tui_app`: the `parley` command (what torchrun and the tests start)."""
from tui_app.main import main

main()
