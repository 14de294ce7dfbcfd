"""The `parley` console command: the app with no arguments, the engine's CLI otherwise."""
import sys

from engine import cli


def run_app(args) -> None:
    from tui_app.app import ParleyApp
    ParleyApp(model=args.model, device=getattr(args, "device", None)).run()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sys.exit(cli.main(argv or ["app"], app=run_app))
