"""The `parley` console command: the app with no arguments, the engine's CLI otherwise."""
import sys

from engine import cli


def run_app(args) -> None:
    from tui_app.app import ParleyApp
    ParleyApp(model=args.model, device=getattr(args, "device", None), quantize=getattr(args, "quantize", None),
              reward_model=getattr(args, "reward_model", None)).run()


APP_OPTIONS = ("--model", "--device", "--quantize", "--reward-model")   # `parley --quantize int8` is `parley app --quantize int8`


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].split("=")[0] in APP_OPTIONS:
        argv = ["app", *argv]
    sys.exit(cli.main(argv, app=run_app))
