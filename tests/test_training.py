"""Training on tiny models and data: loss goes down, masking, resume after SIGKILL, DDP, bad input."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import engine
from engine import ParleyError, data
from engine.store import Store
from engine.train.tokenizer import train_tokenizer
from engine.train.config import PretrainConfig, SFTConfig
from engine.train.trainer import train

TOPICS = ["the sea", "my garden", "a good book", "the weather", "coffee", "trains", "music", "the mountains"]


def corpus(n=60):
    conversations = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        conversations.append({"messages": [
            {"role": "user", "content": f"hi! what do you think about {topic}?"},
            {"role": "assistant", "content": f"I really like {topic}. What about you?"},
            {"role": "user", "content": f"I like {topic} too, number {i % 7}."},
            {"role": "assistant", "content": "That is nice to hear!"}]})
    return conversations


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus()))
    train_set, _ = data.load(str(root / "chat.jsonl"))
    train_tokenizer(train_set, 320).save(root / "tok")
    return root


def config(workspace, out, **changes):
    base = dict(out=str(out), data=str(workspace / "chat.jsonl"), preset="tiny",
                tokenizer=str(workspace / "tok"), seq_len=32, batch_size=8, lr=3e-3, warmup_steps=2, max_steps=12,
                eval_every=4, eval_batches=2, save_every=3, seed=3, device="cpu")
    config = SFTConfig if changes.pop("mode", "pretrain") == "sft" else PretrainConfig
    return config(**{**base, **changes})


def parley(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tui_app", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def losses(home, out=None) -> list[float]:
    with Store(home / "parley.db") as store:
        run = store.runs()[0]["id"]
        return [m["value"] for m in store.metrics(run, "loss")]


def test_tokenizer_loads_in_engine_and_transformers(workspace):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(workspace / "tok")
    ours = engine.tokenizer.Tokenizer.from_dir(workspace / "tok")
    chat = corpus(1)[0]["messages"]
    assert ours.render_chat(chat) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.encode_chat(chat) == ref.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert ours.render_chat(chat).startswith("<|endoftext|><|im_start|>user\n")


def test_assistant_only_masking(workspace):
    tok = engine.tokenizer.Tokenizer.from_dir(workspace / "tok")
    chat = corpus(1)[0]["messages"]
    ids, mask = data.encode(tok, chat, assistant_only=True)
    learned = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert learned == "I really like the sea. What about you?<|im_end|>\nThat is nice to hear!<|im_end|>\n"
    assert all(data.encode(tok, chat)[1])


def test_loss_decreases_and_the_result_is_a_model(workspace, tmp_path):
    with Store(tmp_path / "parley.db") as store:
        out = train(config(workspace, tmp_path / "m", max_steps=30, save_every=10), store)
        curve = [m["value"] for m in store.metrics(store.runs()[0]["id"], "loss")]
        eval_curve = [m["value"] for m in store.metrics(store.runs()[0]["id"], "eval_loss")]
        assert store.runs()[0]["status"] == "finished"
        assert store.model("m")["path"] == str(out.resolve())
    assert curve[-1] < curve[0] - 1.5 and eval_curve[-1] < eval_curve[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000020", "step-000030"]  # the last two
    lm = engine.load(out, device="cpu")
    assert lm.tokenizer.render_chat([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_sft_learns_only_from_assistant_tokens(workspace, tmp_path):
    pre = train(config(workspace, tmp_path / "pre", max_steps=20, save_every=20))
    sft = train(config(workspace, tmp_path / "sft", mode="sft", preset=None, tokenizer=None, model=str(pre),
                       max_steps=80, save_every=80, eval_every=40))
    lm = engine.load(sft, device="cpu")
    from engine.generate import generate
    from engine.settings import Settings
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "hi! what do you think about music?"}])
    reply = generate(lm, prompt, Settings(temperature=0, max_new_tokens=20))[0]
    # The user's turns are never learned, so the reply is the assistant's pattern, not the user's.
    assert reply.text.startswith("I really like")


TRAIN_ARGS = ["train", "pretrain", "--preset", "tiny", "--seq-len", 32, "--batch-size", 8, "--lr", 3e-3,
              "--warmup-steps", 2, "--max-steps", 12, "--eval-every", 4, "--eval-batches", 2, "--save-every", 3,
              "--seed", 3, "--device", "cpu"]


def test_resume_after_sigkill_follows_the_same_loss_curve(workspace, tmp_path):
    args = TRAIN_ARGS + ["--tokenizer", workspace / "tok", "--data", workspace / "chat.jsonl"]
    whole = tmp_path / "whole"
    assert parley(*args, "--out", whole / "m", env={"PARLEY_HOME": str(whole)}).returncode == 0

    cut = tmp_path / "cut"
    env = {**os.environ, "PARLEY_HOME": str(cut)}
    proc = subprocess.Popen([sys.executable, "-m", "tui_app", *map(str, args), "--out", str(cut / "m")], env=env,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("step 8/"):   # checkpoint 6 exists; steps 7-8 will be redone
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "m" / "config.json").exists()
    resumed = parley(*args, "--out", cut / "m", "--resume", env={"PARLEY_HOME": str(cut)})
    assert resumed.returncode == 0, resumed.stderr
    assert losses(cut) == losses(whole)          # bit for bit, every step
    a = engine.load(whole / "m", device="cpu").model.state_dict()
    b = engine.load(cut / "m", device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_checkpoint_gives_a_clear_error_and_the_previous_one_works(workspace, tmp_path):
    out = train(config(workspace, tmp_path / "m", max_steps=9))
    latest = out / "checkpoints" / "step-000009"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])   # truncated
    with pytest.raises(ParleyError, match=r"checkpoint .*step-000009 is damaged .*: delete it to resume from step-000006"):
        train(config(workspace, out, max_steps=12, resume=True))
    shutil.rmtree(latest)
    train(config(workspace, out, max_steps=12, resume=True))
    assert engine.load(out, device="cpu")


def test_two_processes_match_one_on_the_same_global_batch(workspace, tmp_path):
    common = TRAIN_ARGS + ["--tokenizer", workspace / "tok", "--data", workspace / "chat.jsonl", "--max-steps", 6]
    single = parley(*common, "--grad-accum", 2, "--out", tmp_path / "one" / "m", env={"PARLEY_HOME": str(tmp_path / "one")})
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tui_app", *map(str, common), "--out", str(tmp_path / "two" / "m")],
                         capture_output=True, text=True, env={**os.environ, "PARLEY_HOME": str(tmp_path / "two")})
    assert ddp.returncode == 0, ddp.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(one, two))
    a = engine.load(tmp_path / "one" / "m", device="cpu").model.state_dict()
    b = engine.load(tmp_path / "two" / "m", device="cpu").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]', r"bad\.jsonl:2: invalid JSON"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', r"bad\.jsonl:2: messages\[0\] needs a role"),
    ('{"text": "hi"}', r'bad\.jsonl:2: needs "messages"'),
])
def test_bad_data_lines_are_reported_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(corpus(1)[0]) + "\n" + line + "\n")
    with pytest.raises(ParleyError, match=message):
        data.load(str(path))


def test_eval_prints_per_token_and_per_word_perplexity(workspace, tmp_path):
    out = train(config(workspace, tmp_path / "m", max_steps=6))
    # the tiny corpus has too few conversations for a held-out split of its own; give a file that has one
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus(400)))
    run = parley("eval", "--model", out, "--data", tmp_path / "eval.jsonl", "--device", "cpu", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["examples"] > 0 and result["words"] < result["tokens"]
    assert result["ppl_per_word"] > result["ppl_per_token"] > 1
    assert math.isclose(math.log(result["ppl_per_token"]) * result["tokens"],
                        math.log(result["ppl_per_word"]) * result["words"], rel_tol=1e-6)


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_keeps_a_line_for_the_first_step_each_evaluation_and_the_end(monkeypatch, terminal):
    import io

    from engine.train.progress import StepProgress
    if terminal:
        monkeypatch.setenv("FORCE_COLOR", "1")   # Rich then draws its bar, as on a terminal
    out = io.StringIO()
    progress = StepProgress(6, 0, ("loss", "eval_loss"), stream=out)
    assert (progress.bar is not None) == terminal
    for step in range(1, 7):
        progress.show(step, {"loss": 1.0 / step, "lr": 0.1, **({"eval_loss": 2.0} if step == 3 else {})})
    progress.close()
    import re
    lines = [line for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()).splitlines()
             if line.startswith("step ") and "━" not in line]   # kept lines, not the bar
    expected = ["step 3/6  loss 0.3333  eval_loss 2", "step 6/6  loss 0.1667"]
    assert lines == (expected if terminal else ["step 1/6  loss 1"] + expected)


def test_train_takes_known_model_names_as_generate_does():
    from engine.registry import resolve_model
    from engine.train.run import load_model
    lm = load_model("default", "cpu")         # the shipped model, by name
    assert lm.path == resolve_model("default") and lm.dtype == torch.float32
    with pytest.raises(ParleyError):
        load_model("no-such-model", "cpu")


def test_sft_aux_lm_is_gpt1s_objective(workspace, tmp_path):
    """--aux-lm λ: one step of SFT equals a hand-written step on (Σ assistant NLL + λ Σ other NLL) /
    assistant tokens (GPT-1's L3 = L2 + λ·L1), and the logged losses are each term's own mean."""
    import torch.nn.functional as F

    from engine.tokenizer import Tokenizer
    from engine.train.presets import new_lm
    from engine.train.trainer import Batches, pack
    c = config(workspace, tmp_path / "aux", mode="sft", aux_lm=0.7, max_steps=1, warmup_steps=1, eval_every=1,
               save_every=1, grad_clip=0.5)
    with Store(tmp_path / "parley.db") as store:
        out = train(c, store)
        run = store.runs()[0]["id"]
        logged = {name: store.metrics(run, name)[0]["value"] for name in ("loss", "lm_loss", "eval_lm_loss")}

    ref = new_lm("tiny", Tokenizer.from_dir(workspace / "tok"), c.seed).model.train()
    train_set, heldout = data.load(c.data)
    ids, mask = pack(ref_tok := Tokenizer.from_dir(workspace / "tok"), train_set, True, c.seq_len)
    rows = Batches(len(ids), c.batch_size, c.seed).rows(0)

    def nll_split(model, ids, mask):
        nll = F.cross_entropy(model(ids[:, :-1]).transpose(1, 2), ids[:, 1:], reduction="none")
        m = mask[:, 1:].float()
        assert 0 < m.sum() < m.numel()   # both terms have tokens: a mask with holes
        return (nll * m).sum(), (nll * (1 - m)).sum(), m.sum(), (1 - m).sum()

    asst, other, n_asst, n_other = nll_split(ref, ids[rows], mask[rows])
    assert logged["loss"] == pytest.approx((asst / n_asst).item(), rel=1e-5)
    assert logged["lm_loss"] == pytest.approx((other / n_other).item(), rel=1e-5)
    ((asst + 0.7 * other) / n_asst).backward()
    params = [p for p in ref.parameters()]
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
                       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                      lr=c.lr, betas=(0.9, 0.95), eps=1e-8).step()
    trained = engine.load(out, device="cpu").model.state_dict()
    for name, value in ref.state_dict().items():
        # Adam divides by |g|: where a gradient is ~0, summation order alone moves a weight by ~1e-6
        # (lr is 3e-3, and a wrong λ or mask moves most weights by up to 2 lr)
        torch.testing.assert_close(trained[name], value, rtol=0, atol=2e-5, msg=name)

    eval_ids, eval_mask = pack(ref_tok, heldout, True, c.seq_len)
    n = c.eval_batches * c.batch_size
    with torch.no_grad():
        _, other, _, n_other = nll_split(ref.eval(), eval_ids[:n], eval_mask[:n])
    assert logged["eval_lm_loss"] == pytest.approx((other / n_other).item(), rel=1e-5)


def test_sft_aux_lm_flag_is_refused_below_zero(workspace, tmp_path):
    result = parley("train", "sft", "--model", "x", "--out", tmp_path / "o", "--aux-lm", "-1", "--no-store")
    assert result.returncode != 0 and "--aux-lm" in result.stderr and "Traceback" not in result.stderr
