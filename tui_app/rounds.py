""""Train on my rankings": one round of InstructGPT's loop, rank -> train -> rank the new model.

One key (the dashboard's and the arena's) starts a DPO run (or a reward model) of the chat model on
the store's preference pairs, with defaults sized for the model, as a `parley train` process like any
run the dashboard starts. When it finishes, the trainer has registered the new model with its parent
and run (engine/train/run.py), and compare opens with the old and the new model side by side on a
held-out prompt of the user's own: the newest prompt of a conversation none of whose pairs the run
trained on (the trainer's own split, engine.data.split_by_prompt), else the newest prompt, said so.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

from engine.data import split_by_prompt
from engine.errors import ParleyError
from tui_app.runs import launch, why_it_failed

KINDS = ("dpo", "rm")


@dataclass
class RoundConfig:
    """The defaults of a round, by the size of the model it trains."""
    min_pairs: int = 4               # fewer say too little: DPO and the reward model both refuse below this
    lora_above: int = 50_000_000     # parameters; a larger model trains a LoRA adapter, not every weight
    lora_r: int = 8
    epochs: int = 3                  # passes over the ranked prompts, within min_steps..max_steps
    min_steps: int = 10
    max_steps: int = 100
    max_steps_lora: int = 60         # a large model's step costs seconds: fewer of them
    prompts_per_step: int = 8
    beta: float = 0.1                # DPO's KL strength (the trainer's default)
    dpo_lr: float = 5e-5
    dpo_lr_lora: float = 5e-4        # LoRA wants a larger learning rate than full training
    rm_lr: float = 5e-4
    rm_lr_lora: float = 1e-3


DEFAULTS = RoundConfig()


def arguments(kind: str, model: str, parameters: int, prompts: int, out: Path, device: str | None,
              config: RoundConfig = DEFAULTS) -> list[str]:
    """The `parley train` arguments of a round: DPO (or the reward model) of `model` on the store's
    pairs, sized for its `parameters` and the number of ranked `prompts`."""
    lora = parameters > config.lora_above
    per_step = max(1, min(config.prompts_per_step, prompts))
    cap = config.max_steps_lora if lora else config.max_steps
    steps = min(cap, max(config.min_steps, math.ceil(config.epochs * prompts / per_step)))
    if kind == "dpo":
        args = ["train", "dpo", "--policy", model, "--beta", str(config.beta),
                "--lr", str(config.dpo_lr_lora if lora else config.dpo_lr)]
    else:
        args = ["train", "rm", "--base", model, "--lr", str(config.rm_lr_lora if lora else config.rm_lr)]
    args += ["--prefs", "store", "--out", str(out), "--max-steps", str(steps), "--prompts-per-step", str(per_step),
             "--eval-every", str(max(1, steps // 4)), "--save-every", str(steps)]
    if lora:
        args += ["--lora-r", str(config.lora_r)]
    if device:
        args += ["--device", device]
    return args


def trained_conversations(store) -> set[str]:
    """The conversations whose pairs a run on the store's preferences trains on now: those of the
    prompts the trainer's split puts on the training side."""
    groups = store.pairs_by_prompt()
    train, _ = split_by_prompt(groups)
    return {pair["conversation_id"] for group in train for pair in group["pairs"]}


def held_out_prompt(store, trained: set[str]) -> tuple[dict | None, str]:
    """The user message to compare the old and the new model on, and a note saying what it is."""
    prompt = store.latest_user_message(outside=trained)
    if prompt is not None:
        return prompt, "a held-out prompt (its conversation was not trained on)"
    prompt = store.latest_user_message()
    return prompt, "no conversation was left out of training: this is your latest prompt, which was trained on"


def output_folder(store, model: str, kind: str) -> Path:
    """Where a round writes: MODELS/NAME-KIND-N next to the store, the first N free on disk and in
    the models table (a round of a round's model counts on, default-dpo-1, default-dpo-2, …)."""
    stem = re.sub(r"-(dpo|rm)-\d+$", "", Path(model.rstrip("/")).name) or "model"
    folder = store.path.parent / "models"
    n = 1
    while (folder / f"{stem}-{kind}-{n}").exists() or store.model(f"{stem}-{kind}-{n}") is not None:
        n += 1
    return folder / f"{stem}-{kind}-{n}"


@dataclass
class Round:
    kind: str
    model: str                       # the model trained from: the chat model when the round started
    out: Path
    process: object
    log: Path
    trained: set[str]                # conversations whose pairs it trains on
    done: bool = False


def start(app, kind: str = "dpo", config: RoundConfig = DEFAULTS) -> Round:
    """Start a round on the chat model; raises ParleyError (one line: what is missing, what to do)."""
    if kind not in KINDS:
        raise ParleyError(f"a round trains dpo or rm, not {kind!r}")
    store = app.store
    running = next((r for r in app.rounds if not r.done), None)
    if running is not None:
        raise ParleyError(f"a round is under way already ({running.kind} of {running.model}, pid "
                          f"{running.process.pid}): wait for it, or cancel it on the dashboard (F8)")
    pairs = store.counts()["preference_pairs"]
    if pairs < config.min_pairs:
        raise ParleyError(f"training on your rankings needs at least {config.min_pairs} preference pairs and the "
                          f"store has {pairs}: rank {config.min_pairs - pairs} more (Ctrl+O in the chat compares "
                          "replies)")
    if app.lm is None:
        raise ParleyError(f"the chat model {app.model_name} is not loaded yet: wait for it (the status line says "
                          "when it is ready), then try again")
    model = app.model_name
    prompts = len(store.pairs_by_prompt())
    out = output_folder(store, model, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    args = arguments(kind, model, app.lm.num_parameters(), prompts, out, app.device, config)
    trained = trained_conversations(store)   # before the trainer reads the pairs
    process, log = launch(store.path.parent, args)
    round_ = Round(kind, model, out, process, log, trained)
    app.rounds.append(round_)
    if len(app.rounds) == 1:
        app.set_interval(1.0, lambda: check(app))
    app.notify(f"training {'DPO' if kind == 'dpo' else 'a reward model'} of {model} on your {pairs} preference "
               f"pairs: {' '.join(args[2:])} (pid {process.pid}); the dashboard (Ctrl+B) shows its progress")
    return round_


def train_on_my_rankings(app, kind: str = "dpo") -> Round | None:
    """The keys' action: start a round, or say in one line why not."""
    try:
        return start(app, kind)
    except ParleyError as e:
        app.notify(str(e), title="not started", severity="error", timeout=15)
        return None


def check(app) -> None:
    """Every second: a round whose process ended is reported, and a DPO round's models compared."""
    for round_ in app.rounds:
        if round_.done or (code := round_.process.poll()) is None:
            continue
        round_.done = True
        run = next((r for r in app.store.runs() if r["pid"] == round_.process.pid), None)
        if code in (130, -15) or (run is not None and run["status"] == "cancelled"):
            app.notify(f"the {round_.kind} round of {round_.model} was cancelled")
            continue
        if code != 0 or run is None or run["status"] != "finished":
            app.notify(f"the {round_.kind} round of {round_.model} failed: {why_it_failed(round_.log, code)} "
                       f"(log: {round_.log})", title="round failed", severity="error", timeout=20)
            continue
        if round_.kind == "rm":   # a reward model is no chat model: it is not registered, nor compared
            app.notify(f"reward model {round_.out} trained from {round_.model} (run {run['id']}): fine-tune against "
                       f"it with parley train ppo --policy {round_.model} --reward-model {round_.out} --out DIR",
                       timeout=20)
            continue
        registered = app.store.model_by_name_or_path(str(round_.out))
        compare(app, round_, registered["name"] if registered else str(round_.out))


def compare(app, round_: Round, new_model: str) -> None:
    """Compare opens on the held-out prompt: pane A the old model, pane B the new, at the same settings."""
    from tui_app.screens.compare import CompareScreen
    store = app.store
    prompt, note = held_out_prompt(store, round_.trained)
    if prompt is None:
        app.notify(f"{new_model} is trained and registered (Ctrl+L picks it); write a message to compare it "
                   f"with {round_.model}", timeout=20)
        return
    settings = app.settings
    screen = CompareScreen(prompt["conversation_id"], prompt["id"], settings, panes=2)
    screen.models = {0: round_.model, 1: new_model}
    screen.overrides = {0: {"temperature": settings.temperature}, 1: {"temperature": settings.temperature}}
    conversation = prompt["conversation_id"]

    async def compared(best: str | None) -> None:
        if best:
            store.set_current_leaf(conversation, best)
        from tui_app.screens.chat import ChatScreen
        for shown in app.screen_stack:
            if isinstance(shown, ChatScreen) and shown.conversation_id == conversation:
                await shown.open_conversation(conversation)
    app.push_screen(screen, compared)
    app.notify(f"{new_model} (trained from {round_.model}) against {round_.model} on {note}: rank them, and the "
               f"next round learns from it (Ctrl+L in the chat switches to {new_model}, for a round trained from it)",
               timeout=20)
