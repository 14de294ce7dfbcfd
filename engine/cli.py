"""The `parley` command line. Each subcommand is a small function over the engine's API.

Bad input ends in one line on stderr and exit status 1, never a traceback.
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

from engine.errors import ParleyError
from engine.terminal import printable


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals on one line like every other error (its usage is in --help)."""

    def error(self, message):
        self.exit(2, printable(f"{self.prog}: error: {message} (see {self.prog} --help)") + "\n")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: bfloat16 on a GPU that has it, else float32)")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights, one scale per output channel (CPU only; "
                   "activations stay in --dtype): a quarter of float32's bytes per token (engine/quantize.py)")


def cmd_inspect(args) -> None:
    import engine
    from engine.registry import resolve_model
    lm = engine.load(resolve_model(args.model), device=args.device, dtype=args.dtype, quantize=args.quantize)
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


def add_decoding_options(p) -> None:
    """A flag per decoding setting, with its help, from engine/settings.py."""
    from dataclasses import MISSING, fields

    from engine.settings import FIELDS, Settings
    defaults = {f.name: f.default for f in fields(Settings) if f.default is not MISSING}
    for name, (kind, knob) in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if name in ("stop", "dry_sequence_breakers"):   # repeated flags; given ones replace the default list
            p.add_argument(flag, action="append", help=knob.help)
        elif name == "early_stopping":
            p.add_argument(flag, choices=["true", "false", "never"], help=knob.help)
        else:
            p.add_argument(flag, dest=name, type=kind, help=f"{knob.help} (default {defaults[name]})")


def settings_from_args(args):
    from engine.settings import FIELDS, Settings
    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}
    if "early_stopping" in given:
        given["early_stopping"] = {"true": True, "false": False}.get(given["early_stopping"], "never")
    return Settings(**given).validate()


def cmd_generate(args) -> None:
    import dataclasses
    import random

    import engine
    from engine.generate import Finished, Generation, Token
    from engine.registry import resolve_model

    from engine.generate import MAX_ROWS
    base = settings_from_args(args)
    if not 1 <= args.n <= MAX_ROWS:
        raise ParleyError(f"--n {args.n} is out of range: it must be between 1 and {MAX_ROWS}")
    if base.seed is not None and base.seed + args.n - 1 >= 2**63:
        raise ParleyError(f"--seed {base.seed} with --n {args.n} seeds candidates up to {base.seed + args.n - 1}, "
                          "past 2**63 - 1: use a smaller --seed")
    for flag in ("prompt", "system"):
        check_utf8(f"--{flag}", getattr(args, flag))
    path = resolve_model(args.model)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
    seed = base.seed if base.seed is not None else random.randrange(2**62)
    candidates = [dataclasses.replace(base, seed=seed + i) for i in range(args.n)]
    from engine import bert_fill
    if bert_fill.is_bert_dir(path):
        return print_results(args, fill_masks(args, path, messages, candidates), stream=False, mask_filling=True)
    lm = engine.load(path, device=args.device, dtype=args.dtype, decode_only=True, quantize=args.quantize,
                     compile=args.compile)
    prompt_ids = lm.tokenizer.encode(args.prompt) if args.raw else lm.tokenizer.encode_chat(messages)
    gen = Generation(lm, prompt_ids, candidates, top_alternatives=0)
    stream = args.n == 1 and not args.json and base.num_beams == 1
    results = []
    try:
        for event in gen:
            if stream and isinstance(event, Token):
                print(printable(event.text), end="", flush=True)
            elif isinstance(event, Finished):
                results.append(event)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise
    print_results(args, results, stream)


def print_results(args, results, stream: bool, mask_filling: bool = False) -> None:
    """`parley generate`'s candidates in order: JSON lines, or their texts (after the streamed one, a newline)."""
    for r in sorted(results, key=lambda r: r.candidate):
        if args.json:
            line = {"candidate": r.candidate, "text": r.text, "token_ids": r.token_ids,
                    "finish_reason": r.finish_reason, "settings": r.settings.to_dict(), "timings": r.timings}
            if r.beams:
                line["beams"] = r.beams
            if mask_filling:
                line["mask_filling"] = True
            print(json.dumps(line, ensure_ascii=False))
        elif stream:
            print()
        else:
            if args.n > 1:
                print(f"--- candidate {r.candidate} (seed {r.settings.seed}, {r.finish_reason}) ---")
            print(printable(r.text))


def fill_masks(args, path, messages: list[dict], candidates: list) -> list:
    """`parley generate` with a BERT: each reply filled in by iterative mask filling (engine/bert_fill.py)."""
    from engine import bert_fill
    if args.quantize:
        raise ParleyError(f"{path} is a BERT, which int8 weights do not cover: run it without --quantize")
    filler = bert_fill.load(path, args.device)
    prompt_ids = (filler.tokenizer.encode(args.prompt, add_special_tokens=False) if args.raw
                  else filler.prompt_ids(messages))
    fill = bert_fill.MaskFilling(filler, prompt_ids, candidates)
    print(f"{path}: {bert_fill.note(candidates[0])}, {fill.settings[0].max_new_tokens} positions filled most "
          "confident first, not written left to right", file=sys.stderr)
    return fill.run()


def check_utf8(flag: str, text: str | None) -> None:
    """Refuse an argument that is not UTF-8 (Python keeps its bad bytes as lone surrogates)."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else ord(text[e.start])
        raise ParleyError(f"{flag} is not valid UTF-8 (byte 0x{bad:02x} at character {e.start}): "
                          "pass UTF-8 text (check the terminal's or the file's encoding)") from None


def cmd_export(args) -> None:
    from engine.store import Store
    from engine.store.exchange import export
    with Store() as store:
        n = export(store, args.kind, args.format, args.out)
    if args.out != "-":
        print(f"wrote {n} {args.kind} lines to {args.out}", file=sys.stderr)


def cmd_export_model(args) -> None:
    from engine.export_gguf import export_model
    from engine.registry import resolve_model
    out = export_model(resolve_model(args.model), args.out, args.format, args.dtype)
    print(f"wrote {out}", file=sys.stderr)


def cmd_import(args) -> None:
    from engine.store import Store
    from engine.store.exchange import import_file
    with Store() as store:
        counts = import_file(store, args.kind, args.file)
    print("imported " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=sys.stderr)


def add_config_options(p: argparse.ArgumentParser, config_class) -> None:
    """A flag per field of a trainer's config dataclass (engine/train/config.py), with its help."""
    import types
    from dataclasses import fields
    for f in fields(config_class):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        kind = next((t for t in getattr(f.type, "__args__", (f.type,)) if t is not types.NoneType), str)
        shown = "" if f.default is None or meta["required"] else f" (default {f.default})"
        if kind is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(flag, dest=f.name, action=action, default=None, help=meta["help"])
        else:
            p.add_argument(flag, dest=f.name, type=kind, choices=meta["choices"], required=meta["required"],
                           help=meta["help"] + shown)


def config_from_args(config_class, args):
    """The config of the flags given; the fields left out keep their defaults."""
    from dataclasses import fields
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)
                           if getattr(args, f.name) is not None})


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_train(args) -> None:
    from engine.train import config as configs
    # The app cancels a run with SIGTERM (SIGINT may be ignored in a process it starts): both end
    # the run as "cancelled", after the last complete step.
    signal.signal(signal.SIGTERM, _interrupt)
    config = config_from_args(configs.CONFIGS[args.mode], args)
    configs.validate(config)   # before the store opens: a refused run leaves no trace
    # under torchrun only the first process records the run
    if args.no_store or args.mode in ("tokenizer", "ngram", "word2vec", "elmo") or os.environ.get("RANK", "0") != "0":
        configs.run(config)
    else:
        from engine.store import Store
        with Store() as store:
            configs.run(config, store)


def cmd_merge(args) -> None:
    from engine import lora
    from engine.files import check_output_dir
    from engine.registry import resolve_model
    path = resolve_model(args.adapter)
    if not lora.is_adapter(path):
        raise ParleyError(f"{path} has no adapter_config.json: `parley merge` takes a LoRA adapter directory "
                          "(what `parley train ... --lora-r R` writes)")
    if args.quantize:
        raise ParleyError("parley merge writes the merged model's float weights: leave out --quantize "
                          "(pass it where the merged model is loaded, e.g. parley generate --quantize int8)")
    check_output_dir(args.out)   # before the work
    lm = lora.load(path, device=args.device, dtype=args.dtype or "float32")
    lm.save(args.out)
    print(f"wrote {args.out}: {lm.config['model_type']} with the adapter of {path} merged", file=sys.stderr)


def cmd_similar(args) -> None:
    from engine.checkpoint import read_json
    from engine.models.word2vec import Word2Vec
    check_top(args.top)
    config = read_json(Path(args.model).expanduser() / "config.json", required=False) \
        if Path(args.model).expanduser().is_dir() else None
    elmo = (config or {}).get("model_type") == "parley_elmo"
    if args.context is None:
        if elmo:
            raise ParleyError(f"{args.model} is an ELMo model, whose vectors depend on their sentence: add "
                              "--context \"a sentence with the word\"")
        model = Word2Vec.load(args.model)
        print_neighbours(model.similar(args.word, args.top), model.shown)
        return
    if not elmo:
        raise ParleyError(f"--context needs an ELMo model (what `parley train elmo` writes); {args.model} is not "
                          "one (word2vec's vectors are the same in every sentence: leave out --context)")
    cmd_similar_in_context(args, config)


def cmd_similar_in_context(args, config: dict) -> None:
    """ELMo's nearest words to WORD in --context: every word of --data's sentences in its own sentence."""
    import engine
    from engine import data
    from engine.models.elmo import contextual_neighbours
    from engine.models.word2vec import words
    from engine.train.word2vec import sentences_of
    if args.max_sentences < 1:
        raise ParleyError(f"--max-sentences {args.max_sentences} is out of range: it must be 1 or more")
    lm = engine.load(args.model, device=args.device, dtype="float32")
    source = args.data or config.get("data") or "chitchat"
    train, heldout = data.load(source)
    sentences = sentences_of(train + heldout)[:args.max_sentences]
    target = words(args.word)
    if len(target) != 1:
        raise ParleyError(f"{args.word!r} is not one word (words are letters, lower-cased): give one word")
    layer = None if args.layer == "mix" else lm.config["num_layers"] if args.layer == "top" else int(args.layer) \
        if args.layer.isdigit() else -1
    rows = contextual_neighbours(lm.model, words(args.context), target[0], sentences, args.top, layer)
    for word, cosine, sentence, i in rows:
        shown = " ".join(f"[{w}]" if k == i else w for k, w in enumerate(sentence))
        print(f"{printable(word)}\t{cosine:.4f}\t{printable(shown)}")


def cmd_analogy(args) -> None:
    from engine.models.word2vec import Word2Vec
    check_top(args.top)
    model = Word2Vec.load(args.model)
    print_neighbours(model.analogy(args.a, args.b, args.c, args.top), model.shown)


def check_top(top: int) -> None:
    if top < 1:
        raise ParleyError(f"--top {top} is out of range: it must be 1 or more")


def print_neighbours(rows: list[tuple[str, float]], shown=str) -> None:
    for word, cosine in rows:
        print(f"{printable(shown(word))}\t{cosine:.4f}")


def cmd_score(args) -> None:
    from engine.rlhf.reward_model import score_file
    for row in score_file(args.reward_model, args.file, args.device):
        print(json.dumps(row) if len(row) > 1 else f"{row['response']:.6f}")


def cmd_eval(args) -> None:
    import engine
    from engine import data
    from engine.registry import resolve_model
    from engine.train.evaluate import BertModel, compare, load_for_eval, table
    names = args.model or ["default"]
    models = {}
    for name in names:   # with --quantize, each causal model twice: as loaded and quantized, side by side
        models[name] = load_for_eval(resolve_model(name), args.device, args.dtype)
        if args.quantize and not isinstance(models[name], BertModel):
            models[f"{name} {args.quantize}"] = engine.load(resolve_model(name), device=args.device, dtype=args.dtype,
                                                            quantize=args.quantize)
    _, heldout = data.load(args.data)
    if not heldout:
        raise ParleyError(f"{args.data} has no held-out examples (the split keeps about 1 in 20): use a larger file")
    rows = compare(models, heldout, args.max_examples)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"held-out: {rows[0]['examples']} examples, {rows[0]['words']} words "
              f"(tokens differ by tokenizer; per-word perplexity compares across them)")
        print(table(rows))


def cmd_arena(args) -> None:
    from engine.arena import ArenaConfig, ratings, table
    from engine.store import Store
    config = ArenaConfig(by=args.by, rounds=args.rounds, seed=args.seed, anchor=args.anchor).check()
    with Store() as store:
        rows = ratings(store, config)
        agreement = None
        if args.reward_model:
            from engine.rlhf.reward_model import agreement_of, load_reward_model
            agreement = agreement_of(load_reward_model(args.reward_model, args.device), store, config)
    if not rows:
        print("no battles yet: rank the candidates of a comparison in the app (Ctrl+O) whose settings or models "
              "differ", file=sys.stderr if args.json else sys.stdout)
    elif args.json:
        for row in rows:
            print(json.dumps(row.to_dict(), ensure_ascii=False))
    else:
        print(printable(table(rows)))
        print(f"{sum(r.battles for r in rows) // 2} battles; Bradley-Terry, ties half a win; 95% CI from "
              f"{config.rounds} bootstrap rounds (seed {config.seed}); "
              + (f"{config.anchor} rated 1000" if config.anchor else "mean rating 1000"))
    if agreement is not None:
        print(json.dumps({"agreement": agreement.to_dict()}) if args.json else agreement.line)


def cmd_pull(args) -> None:
    import engine
    from engine import hub
    from engine.registry import register_pulled
    from engine.store import Store
    path = hub.pull(args.name)
    # the whole load (config, tokenizer, every tensor's shape and values) on the CPU, in bfloat16 to
    # halve the memory: the one check that says the model will load, before the app lists it
    try:
        engine.load(path, device="cpu", dtype="bfloat16")
    except ParleyError as e:
        raise ParleyError(f"{args.name} is downloaded ({path}) but does not load: {e}") from None
    with Store() as store:
        added = register_pulled(store, args.name, path)
    print(f"{args.name}: {path}" + (" (added to the app's models)" if added else ""), file=sys.stderr)


def cmd_serve(args) -> None:
    import engine
    from engine.registry import resolve_model
    from engine.serve.app import Server, ServeConfig
    from engine.serve.protocol import Limits
    config = ServeConfig(args.host, args.port, args.api_key, args.max_body_bytes,
                         Limits(args.max_tokens, args.max_n), args.max_rows, not args.no_log).check()
    models = {}
    for name in args.model or ["default"]:
        # a served model only decodes: its weights in their decoding form alone (engine/quantize.py)
        lm = engine.load(resolve_model(name), device=args.device, dtype=args.dtype, decode_only=True,
                         quantize=args.quantize)
        # a directory is served under its folder's name; a known or Hugging Face name as itself
        served = Path(name).expanduser().name if Path(name).expanduser().is_dir() else name
        if served in models:
            raise ParleyError(f"two --model flags serve the name {served!r}: rename one of the directories")
        models[served] = lm
    server = Server(models, config)
    print(f"parley serve: {', '.join(models)} at {server.url} (OpenAI API; Ctrl+C stops)", file=sys.stderr)
    server.run()


def build_parser(app=None) -> argparse.ArgumentParser:
    parser = Parser(prog="parley", description="Talk to local language models, compare decoding "
                                     "settings side by side, and teach them what you prefer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if app is not None:
        p = sub.add_parser("app", help="open the terminal app (the default with no command)")
        p.add_argument("--model", help="model directory or name to chat with")
        p.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
        p.add_argument("--quantize", choices=["int8"], help="int8 weights on the CPU (see parley generate --help)")
        p.add_argument("--reward-model", help="a reward model (parley train rm) that scores the compare panes and "
                       "picks best-of-N replies (remembered; the models screen, Ctrl+L, changes it)")
        p.set_defaults(func=app)

    p = sub.add_parser("inspect", help="load a model directory and describe it")
    p.add_argument("model", help="a Hugging Face-format model directory")
    add_model_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate replies to one prompt, one or several candidates")
    p.add_argument("--model", help="a model directory or a known model name (default: the shipped model)")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="encode the prompt as plain text, without the chat template")
    p.add_argument("--system", help="a system message before the prompt")
    add_decoding_options(p)
    p.add_argument("--n", type=int, default=1, help="number of candidates, generated side by side")
    add_model_options(p)
    p.add_argument("--compile", action="store_true", help="compile the decoding step (torch.compile): faster steps "
                   "after about a minute of compiling on a 2-core CPU, worth it for long or many generations")
    p.add_argument("--json", action="store_true", help="one JSON object per candidate and line")
    p.set_defaults(func=cmd_generate)

    from engine.train.config import CONFIGS
    p = sub.add_parser("train", help="train a tokenizer, an n-gram model, word vectors (word2vec, or contextual: elmo), a language model (pretrain, sft), a reward "
                       "model (rm) or fine-tune against preferences (dpo, ppo, rloo, grpo)")
    modes = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    for mode, config_class in CONFIGS.items():
        m = modes.add_parser(mode, help=(config_class.__doc__ or "").split("\n")[0] or None)
        add_config_options(m, config_class)
        m.add_argument("--no-store", action="store_true", help="do not record the run in Parley's database")
        m.set_defaults(func=cmd_train)

    p = sub.add_parser("pull", help="download a Hugging Face model (only the files Parley reads) into the Hugging "
                       "Face cache, check it loads and add it to the app's models")
    p.add_argument("name", help="org/name or org/name@revision (a branch, tag or commit)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API (chat and completions, "
                       "streaming, continuous batching)")
    p.add_argument("--model", action="append", help="a model directory or known name to serve (default: the "
                   "shipped model); repeat it to serve several")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                   "--api-key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", help="clients must send this key (Authorization: Bearer KEY)")
    p.add_argument("--max-tokens", type=int, default=2048, help="most tokens per reply a request may ask for "
                   "(default 2048)")
    p.add_argument("--max-n", type=int, default=16, help="most choices (n) per request (default 16)")
    p.add_argument("--max-rows", type=int, default=64, help="most choices decoding together per model; more wait "
                   "(default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--no-log", action="store_true", help="do not keep requests and replies in Parley's store")
    add_model_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="held-out loss and perplexity, per token and per word")
    p.add_argument("--model", action="append", help="a model directory or known name (default: the shipped "
                   "model); repeat it to compare several models in one table")
    p.add_argument("--data", help="chitchat (default), a .jsonl of conversations or a .txt")
    p.add_argument("--max-examples", type=int)
    add_model_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    from engine.arena import BY, ArenaConfig
    defaults = ArenaConfig()
    p = sub.add_parser("arena", help="ratings of the decoding presets (and models) your rankings in the compare "
                       "view pit against each other: Bradley-Terry, with 95%% bootstrap intervals")
    p.add_argument("--by", choices=BY, default=defaults.by, help="what a preset is: its settings, its model, or "
                   f"both, as 'settings @ model' (default {defaults.by})")
    p.add_argument("--rounds", type=int, default=defaults.rounds, help="bootstrap resamples behind the intervals "
                   f"(default {defaults.rounds})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the resampling (default "
                   f"{defaults.seed}): the same rankings give the same table")
    p.add_argument("--anchor", help="a preset, as the table names it, to rate 1000 (default: the mean is 1000)")
    p.add_argument("--reward-model", help="a reward model: print how often it orders your ranked pairs as you did, "
                   "on the rankings it did not train on, with a 95%% bootstrap interval")
    p.add_argument("--device", help="where the reward model runs (default: the best available)")
    p.add_argument("--json", action="store_true", help="one JSON object per preset and line, best first (then "
                   "{\"agreement\": ...} with --reward-model)")
    p.set_defaults(func=cmd_arena)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base and write the merged model")
    p.add_argument("adapter", help="a LoRA adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory of the merged model")
    add_model_options(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("similar", help="a word2vec model's nearest words to WORD, by cosine; or, with --context, "
                       "an ELMo model's nearest words in their sentences to WORD in that sentence")
    p.add_argument("word")
    p.add_argument("--model", required=True, help="a word2vec directory (what `parley train word2vec` writes), or "
                   "with --context an ELMo one (`parley train elmo`)")
    p.add_argument("--top", type=int, default=10, help="how many words (default 10)")
    p.add_argument("--context", help="ELMo: a sentence holding WORD; its vector there is compared with every word's "
                   "in the sentences of --data")
    p.add_argument("--data", help="ELMo: the sentences to search (default: the model's training corpus)")
    p.add_argument("--max-sentences", type=int, default=5000, help="ELMo: search the first this many (default 5000)")
    p.add_argument("--layer", default="top", help="ELMo: the vectors compared: top (the last LSTM layer, the "
                   "default: the best at word sense), 0 (the context-free token vectors), 1, 2, or mix (the mean "
                   "of all, the scalar mix's start)")
    p.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("analogy", help="A is to B as C is to ?: a word2vec model's nearest words to B - A + C "
                       "(3CosAdd; A, B and C left out)")
    for name in ("a", "b", "c"):
        p.add_argument(name, metavar=name.upper())
    p.add_argument("--model", required=True, help="a word2vec directory (what `parley train word2vec` writes)")
    p.add_argument("--top", type=int, default=10, help="how many words (default 10)")
    p.set_defaults(func=cmd_analogy)

    p = sub.add_parser("score", help="score replies with a reward model, one line per input line")
    p.add_argument("--reward-model", required=True)
    p.add_argument("file", help='JSONL of {"prompt", "response"} (or {"prompt", "chosen", "rejected"}) rows')
    p.add_argument("--device")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export", help="write conversations, preference pairs or rankings as JSON Lines")
    p.add_argument("kind", choices=["conversations", "prefs", "rankings"])
    p.add_argument("out", help="output file, or - for standard output")
    p.add_argument("--format", choices=["jsonl", "trl"], default="jsonl",
                   help="jsonl: everything Parley keeps; trl: the conversational format TRL and OpenRLHF read")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-model", help="write a model as one GGUF file, for llama.cpp and Ollama "
                       "(Llama, Mistral, Qwen2 and Qwen3 models with a byte-level BPE tokenizer)")
    p.add_argument("model", help="a model directory or a known model name")
    p.add_argument("out", help="the file to write (replaced if it exists), e.g. model.gguf")
    p.add_argument("--format", choices=["gguf"], default="gguf")
    p.add_argument("--dtype", "--outtype", dest="dtype", choices=["float16", "bfloat16", "float32"],
                   help="the matrices' type (default: the checkpoint's bfloat16 or float16, else float16; "
                        "norms and biases are float32, as llama.cpp wants)")
    p.set_defaults(func=cmd_export_model)

    p = sub.add_parser("import", help="read conversations, preference pairs or rankings from JSON Lines (all or "
                       "nothing; what the store already has is skipped and counted)")
    p.add_argument("kind", choices=["conversations", "prefs", "rankings"])
    p.add_argument("file")
    p.set_defaults(func=cmd_import)
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
        print(printable(f"parley: error: {e}").replace("\n", " "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # the reader went away (`parley generate … | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
