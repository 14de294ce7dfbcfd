"""The `parley` console command: the app with no arguments, the engine's CLI otherwise."""
import sys

from engine import cli


def run_app(args) -> None:
    from engine.errors import ParleyError
    raise ParleyError("the terminal app is not built yet: use `parley inspect DIR` (see README, issue 8)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sys.exit(cli.main(argv or ["app"], app=run_app))
