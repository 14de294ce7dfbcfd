"""`parley train mlm`: a BERT learns planted structure, reads back in transformers, resumes exactly,
and `parley eval` gives its pseudo-perplexity beside a causal model, marked as such."""
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine import ParleyError
from engine.models import bert
from engine.train.config import MLMConfig
from engine.train.mlm import train_mlm
from engine.train.tokenizer import train_tokenizer
from engine import data

# each line pairs a colour with its fruit: the masked fruit is predictable from the colour alone
PAIRS = [("red", "cherry"), ("yellow", "banana"), ("green", "lime"), ("purple", "grape"), ("orange", "mango")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    # in a shuffled order, so that only a line's own colour tells its fruit
    order = torch.randint(len(PAIRS), (300,), generator=torch.Generator().manual_seed(0)).tolist()
    lines = [f"the {PAIRS[i][0]} fruit is a {PAIRS[i][1]} ." for i in order]
    (root / "fruit.txt").write_text("\n".join(lines) + "\n")
    train_set, _ = data.load(str(root / "fruit.txt"))
    train_tokenizer(train_set, 420).save(root / "tok")
    return root


def config(workspace, out, **changes):
    return MLMConfig(**{**dict(out=str(out), data=str(workspace / "fruit.txt"), tokenizer=str(workspace / "tok"),
                              hidden_size=32, layers=2, heads=4, seq_len=24, batch_size=16, lr=3e-3, warmup_steps=5,
                              max_steps=150, eval_every=50, save_every=50, seed=1, device="cpu", mask_rate=0.25),
                        **changes})


def test_bert_learns_the_planted_pairs_and_transformers_reads_it(workspace, tmp_path):
    # rows of two whole lines ([CLS], 2 x 7 tokens, [SEP]: "the red fruit is a cherry ." is 7), so that each
    # fruit sits where training put it, four tokens after its colour, beside a line of an independent pair
    out = train_mlm(config(workspace, tmp_path / "bert", seq_len=16, max_steps=1000,
                                eval_every=500, save_every=1000))
    model, tok = bert.load(out)
    one = {word: tok.encode(f" {word}", add_special_tokens=False) for pair in PAIRS for word in pair}
    assert all(len(ids) == 1 for ids in one.values())   # so one masked position asks for one fruit
    asked = right = 0
    for first, second in itertools.product(PAIRS, PAIRS):   # every row training can have held
        text = f"the {first[0]} fruit is a {first[1]} .", f"the {second[0]} fruit is a {second[1]} ."
        row = [tok.token_id("[CLS]"), *(i for t in text for i in tok.encode(t, add_special_tokens=False)),
               tok.token_id("[SEP]")]
        assert len(row) == 16
        for position, fruit in ((6, first[1]), (13, second[1])):
            assert row[position] == one[fruit][0]
            masked = list(row)
            masked[position] = tok.token_id("[MASK]")
            with torch.no_grad():
                right += int(model(torch.tensor([masked]))[0, position].argmax().item() == row[position])
            asked += 1
    assert right / asked >= 0.9, f"{right} of {asked} fruits right (chance is 1 in 5)"
    from transformers import BertForMaskedLM
    ref = BertForMaskedLM.from_pretrained(out).eval()
    ids = torch.tensor([masked])
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(workspace, tmp_path):
    whole = train_mlm(config(workspace, tmp_path / "whole", max_steps=20, save_every=10))
    a = load_file(whole / "model.safetensors")
    # as if the run had stopped after step 10's checkpoint: the one of step 20 is gone
    shutil.rmtree(whole / "checkpoints" / "step-000020")
    cut = train_mlm(config(workspace, tmp_path / "whole", max_steps=20, save_every=10, resume=True))
    b = load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_options_get_one_line(workspace, tmp_path):
    with pytest.raises(ParleyError, match="--heads 5 does not divide --hidden-size 32"):
        train_mlm(config(workspace, tmp_path / "x", heads=5))
    with pytest.raises(ParleyError, match="trains a fresh BERT: drop --lora-r"):
        train_mlm(config(workspace, tmp_path / "x", lora_r=4))


def test_eval_gives_pseudo_perplexity_beside_a_causal_model(workspace, tmp_path):
    out = train_mlm(config(workspace, tmp_path / "bert", max_steps=30))
    lines = [f"the {c} fruit is a {f} ." for i in range(400) for c, f in [PAIRS[i % len(PAIRS)]]]
    (tmp_path / "eval.txt").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PARLEY_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-m", "tui_app", "eval", "--model", str(out), "--data",
                          str(tmp_path / "eval.txt"), "--device", "cpu", "--max-examples", "5", "--json"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    assert row["measure"] == "pseudo-perplexity" and row["family"].startswith("BERT")
    # the same number by hand: every text token of each held-out line masked alone
    model, tok = bert.load(out)
    _, heldout = data.load(str(tmp_path / "eval.txt"))
    scores = []
    for text in heldout[:5]:
        row_ids = [tok.token_id("[CLS]"), *tok.encode(text, add_special_tokens=False), tok.token_id("[SEP]")]
        for i in range(1, len(row_ids) - 1):
            masked = list(row_ids)
            masked[i] = tok.token_id("[MASK]")
            with torch.no_grad():
                scores.append(model(torch.tensor([masked]))[0, i].log_softmax(-1)[row_ids[i]].item())
    assert row["tokens"] == len(scores)
    assert row["ppl_per_token"] == pytest.approx(torch.tensor(scores).mean().neg().exp().item(), rel=1e-4)
    text = subprocess.run([sys.executable, "-m", "tui_app", "eval", "--model", str(out), "--data",
                           str(tmp_path / "eval.txt"), "--device", "cpu", "--max-examples", "5"],
                          capture_output=True, text=True, env=env)
    assert text.returncode == 0 and "* pseudo-perplexity" in text.stdout and "BERT (pseudo-ppl*)" in text.stdout
