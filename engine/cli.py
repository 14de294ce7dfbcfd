"""The `parley` command line. Each subcommand is a small function over the engine's API.

Bad input ends in one line on stderr and exit status 1, never a traceback.
"""
import argparse
import json
import sys

from engine.errors import ParleyError


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: bfloat16 on a GPU that has it, else float32)")


def cmd_inspect(args) -> None:
    import engine
    lm = engine.load(args.model, device=args.device, dtype=args.dtype)
    info = {
        "path": str(lm.path), "model_type": lm.config["model_type"], "parameters": lm.num_parameters(),
        "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
        "vocab_size": lm.tokenizer.vocab_size, "max_context": lm.max_context,
        "eos_token_ids": lm.eos_token_ids, "chat_template": lm.tokenizer.chat_template is not None,
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>14}: {value}")


def build_parser(app=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Talk to local language models, compare decoding "
                                     "settings side by side, and teach them what you prefer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if app is not None:
        p = sub.add_parser("app", help="open the terminal app (the default with no command)")
        p.add_argument("--model", help="model directory or name to chat with")
        p.set_defaults(func=app)

    p = sub.add_parser("inspect", help="load a model directory and describe it")
    p.add_argument("model", help="a Hugging Face-format model directory")
    add_model_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None, app=None) -> int:
    parser = build_parser(app)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        args.func(args)
    except ParleyError as e:
        print(f"parley: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
