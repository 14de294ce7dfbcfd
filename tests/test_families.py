"""Every model family behind one protocol: save, load, generate (greedy, sampling, beam), the
sparse attention masks, `parley eval`'s table, and the textbook order of perplexities."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import engine
from engine import data
from engine.generate import generate
from engine.models import patterns
from engine.models.cache import positions_and_mask
from engine.settings import Settings
from engine.train.evaluate import compare
from engine.train.ngram import train_ngram
from engine.train.presets import new_lm
from engine.train.tokenizer import train_tokenizer
from engine.train.config import PretrainConfig
from engine.train.trainer import train

NAMES = "anna ben carla dev emma farid gina hugo ida jon kim lea max nina omar pia quinn rosa sam tom uma vic will " \
        "xena yuri zoe".split()
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pu"]
THINGS = (["new york", "ice cream", "hot dogs", "san francisco", "rock and roll"]
          + "tea coffee music trains books rain cats bread chess boats snow tennis jazz soup apples kites maps films "
            "poems gardens".split()
          + [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES][:900])
ZIPF = [1 / (rank + 1) for rank in range(len(THINGS))]
VERBS = ["like", "love", "enjoy", "miss", "want", "need", "hate"]
ADJECTIVES = ("good nice warm fun calm cheap old big small red blue green dark light soft hard sweet sour loud quiet "
              "fresh wild odd rare").split()


def corpus(n: int, seed: int = 0) -> list[dict]:
    """Chats with what n-grams cannot see (a name and a topic repeated turns later) and a Zipfian
    vocabulary with collocations (what separates the smoothing methods)."""
    rng = random.Random(seed)

    def thing():
        return rng.choices(THINGS, ZIPF)[0]
    out = []
    for _ in range(n):
        name, topic, verb, other, adj = rng.choice(NAMES), thing(), rng.choice(VERBS), thing(), rng.choice(ADJECTIVES)
        out.append({"messages": [
            {"role": "user", "content": f"hi, i am {name}. i {verb} {topic}."},
            {"role": "assistant", "content": f"nice to meet you {name}! why do you {verb} {topic}?"},
            {"role": "user", "content": f"because {topic} is {adj}. do you {verb} {other}?"},
            {"role": "assistant", "content": f"yes {name}, {other} is {adj} too. i had {rng.choice(ADJECTIVES)} "
                                             f"{thing()} and {rng.choice(ADJECTIVES)} {thing()}."}]})
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus(1500)))
    train_set, _ = data.load(str(root / "chat.jsonl"))
    train_tokenizer(train_set, 320).save(root / "tok")
    return root


TINY = {"nnlm": dict(context=4, embed_dim=16, hidden_size=32), "rnn": dict(hidden_size=32, num_layers=2),
        "gru": dict(hidden_size=32, num_layers=2), "lstm": dict(hidden_size=32, num_layers=2),
        **{name: dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
           for name in ("gpt", "gpt-local", "gpt-dilated", "gpt-strided", "gpt-fixed")}}


def tiny_model(workspace, preset):
    if preset == "ngram":
        return train_ngram(str(workspace / "tok"), str(workspace / "chat.jsonl"), 3, "kneser_ney")
    return new_lm(preset, engine.tokenizer.Tokenizer.from_dir(workspace / "tok"), 0, **TINY[preset])


@pytest.mark.parametrize("preset", [*TINY, "ngram"])
def test_each_family_saves_loads_and_generates(workspace, tmp_path, preset):
    tiny_model(workspace, preset).save(tmp_path / "m")
    lm = engine.load(tmp_path / "m", device="cpu")
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "hi, i am anna. i like tea."}])
    x = torch.tensor([prompt])
    assert torch.equal(lm.logits(x), tiny_model(workspace, preset).logits(x))   # saved and loaded whole

    def logprob_of(tokens):
        """log P(tokens | prompt) by full forward passes, with no cache."""
        full = torch.tensor([prompt + tokens])
        logp = torch.log_softmax(lm.logits(full)[0, len(prompt) - 1:-1], dim=-1)
        return logp[torch.arange(len(tokens)), torch.tensor(tokens)].sum().item()

    # greedy through the incremental state equals greedy over full re-reads of the context
    greedy = generate(lm, prompt, Settings(temperature=0, max_new_tokens=8, min_new_tokens=8))[0].token_ids
    expected = []
    for _ in range(8):
        logits = lm.logits(torch.tensor([prompt + expected]))[0, -1].clone()
        logits[lm.eos_token_ids] = -math.inf       # min_new_tokens
        expected.append(int(logits.argmax()))
    assert greedy == expected
    # seeded sampling is reproducible, alone or beside another candidate
    sampled = Settings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5, max_new_tokens=8)
    alone = generate(lm, prompt, sampled)[0].token_ids
    assert generate(lm, prompt, [Settings(temperature=0, max_new_tokens=8), sampled])[1].token_ids == alone
    # beam search: the best beam's score is its log-probability (length_penalty 0), as a full pass says
    beams = generate(lm, prompt, Settings(num_beams=3, length_penalty=0.0, max_new_tokens=6, min_new_tokens=6,
                                          num_return_sequences=2))[0].beams
    assert len(beams) == 2 and beams[0]["score"] >= beams[1]["score"]
    assert beams[0]["score"] == pytest.approx(logprob_of(beams[0]["token_ids"]), abs=1e-3)
    assert beams[0]["score"] >= logprob_of(greedy[:6]) - 1e-4


def definition(name, i, j, window, stride):
    """The patterns as the papers state them, one pair of positions at a time."""
    if j > i:
        return False
    if name == "local":
        return i - j < window
    if name == "dilated":
        return (i - j) % stride == 0 and (i - j) // stride < window
    if name == "strided":
        return i - j < stride or (i - j) % stride == 0
    if name == "fixed":
        return j // stride == i // stride or j % stride == stride - 1
    return True


@pytest.mark.parametrize("name", list(patterns.PATTERNS))
def test_sparse_masks_match_their_definitions(name):
    window, stride, n = 3, 4, 19
    rule = patterns.rule(name, window, stride)
    _, mask = positions_and_mask(None, n, "cpu", rule)
    expected = torch.tensor([[definition(name, i, j, window, stride) for j in range(n)] for i in range(n)])
    assert torch.equal(mask[0, 0], expected) if mask is not None else name == "dense"
    # left padding shifts slots, not positions: the padded row's mask is the same pattern
    pad = torch.tensor([[False] * 5 + [True] * n])
    _, padded = positions_and_mask(pad, n + 5, "cpu", rule or patterns.rule("local", n, None))
    if name != "dense":
        assert torch.equal(padded[0, 0, 5:, 5:], expected)


@pytest.mark.parametrize("name", ["local", "dilated", "strided", "fixed"])
def test_one_sparse_layer_sees_only_its_pattern(workspace, name):
    lm = new_lm(f"gpt-{name}", engine.tokenizer.Tokenizer.from_dir(workspace / "tok"), 0, n_embd=32, n_layer=1,
                n_head=4, n_positions=64, attention_window=5, attention_stride=4)
    c = lm.model.config
    ids = torch.randint(5, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    base = lm.logits(ids)[0, -1]
    i = ids.shape[1] - 1
    for j in range(i):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1) % 300
        moved = not torch.allclose(lm.logits(changed)[0, -1], base, atol=1e-6)
        assert moved == definition(name, i, j, c.attention_window, c.attention_stride), j


def test_cached_decoding_of_sparse_patterns_equals_full_forward(workspace):
    for name in ("local", "dilated", "strided", "fixed"):
        lm = new_lm(f"gpt-{name}", engine.tokenizer.Tokenizer.from_dir(workspace / "tok"), 0, **TINY["gpt"])
        ids = torch.randint(5, 300, (2, 30), generator=torch.Generator().manual_seed(1))
        full = lm.model(ids)
        cache = lm.model.new_cache(2, 30)
        steps = [lm.model(ids[:, :10], cache=cache)] + [lm.model(ids[:, t:t + 1], cache=cache) for t in range(10, 30)]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5), name


NEURAL = {  # preset: (sizes, learning rate); 400 steps each
    "nnlm": (dict(context=8, embed_dim=32, hidden_size=128), 3e-3),
    "rnn": (dict(hidden_size=192, num_layers=1), 5e-3),
    "gru": (dict(hidden_size=96, num_layers=1), 1e-2),
    "lstm": (dict(hidden_size=96, num_layers=1), 1e-2),
    "gpt": (dict(n_embd=64, n_layer=2, n_head=4, n_positions=65), 3e-3),
    "gpt-local": (dict(n_embd=64, n_layer=2, n_head=4, n_positions=65, attention_window=16), 3e-3),
    "gpt-fixed": (dict(n_embd=64, n_layer=2, n_head=4, n_positions=65, attention_stride=8), 3e-3),
}


def test_perplexities_fall_in_the_textbook_order(workspace):
    tok = engine.tokenizer.Tokenizer.from_dir(workspace / "tok")
    models = {}
    for name, method in [("add-one", "add_k"), ("mle", "mle"), ("katz", "katz"), ("kneser-ney", "kneser_ney")]:
        models[name] = train_ngram(str(workspace / "tok"), str(workspace / "chat.jsonl"), 3, method, 1.0)
    for preset, (sizes, lr) in NEURAL.items():
        new_lm(preset, tok, 0, **sizes).save(workspace / f"{preset}-init")
        out = train(PretrainConfig(out=str(workspace / preset), data=str(workspace / "chat.jsonl"),
                                model=str(workspace / f"{preset}-init"), seq_len=64, batch_size=16, lr=lr,
                                warmup_steps=10, max_steps=400, eval_every=400, save_every=400, device="cpu"))
        models[preset] = engine.load(out, device="cpu")
    _, heldout = data.load(str(workspace / "chat.jsonl"))
    ppl = {r["model"]: r["ppl_per_word"] for r in compare(models, heldout)}
    print({k: round(v, 2) for k, v in sorted(ppl.items(), key=lambda kv: kv[1])})
    assert ppl["mle"] == math.inf          # held-out n-grams never seen in training get probability 0
    smoothed = ("add-one", "katz", "kneser-ney")
    assert max(smoothed, key=ppl.get) == "add-one" and min(smoothed, key=ppl.get) == "kneser-ney"
    assert all(ppl[name] < ppl["kneser-ney"] for name in NEURAL), ppl


def test_eval_prints_one_table_for_several_models_and_train_takes_every_preset(workspace, tmp_path):
    env = {**os.environ, "PARLEY_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "tui_app", "train", "pretrain", "--preset", "lstm", "--tokenizer",
                          str(workspace / "tok"), "--data", str(workspace / "chat.jsonl"), "--max-steps", "2",
                          "--seq-len", "32", "--batch-size", "4", "--out", str(tmp_path / "lstm"), "--device", "cpu"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    tiny_model(workspace, "ngram").save(tmp_path / "kn3")
    run = subprocess.run([sys.executable, "-m", "tui_app", "eval", "--model", str(tmp_path / "lstm"), "--model",
                          str(tmp_path / "kn3"), "--data", str(workspace / "chat.jsonl"), "--device", "cpu"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[1].split()[:2] == ["model", "family"] and len(lines) == 4
    assert any("LSTM x2" in line for line in lines) and any("3-gram kneser_ney" in line for line in lines)
