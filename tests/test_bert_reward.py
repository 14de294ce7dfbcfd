"""A BERT (`parley train mlm`) as a reward model's backbone: the head on [CLS] learns to rank
planted preferences, saves, loads, and scores as a hand computation from the [CLS] vector says."""
import json

import pytest
import torch

from engine import ParleyError
from engine.rlhf.reward_model import load_reward_model, score_file, train_reward_model
from engine.train.config import MLMConfig, RewardModelConfig
from engine.train.mlm import train_mlm
from engine.train.tokenizer import train_tokenizer
from test_reward_model import rows


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_rm")
    lines = rows(300)
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    chats = [{"messages": r["prompt"] + r[k]} for r in lines for k in ("chosen", "rejected")]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    train_tokenizer([c["messages"] for c in chats], 400).save(root / "tok")
    train_mlm(MLMConfig(out=str(root / "bert"), data=str(root / "chat.jsonl"), tokenizer=str(root / "tok"),
                        hidden_size=32, layers=2, heads=4, seq_len=64, batch_size=16, lr=3e-3, warmup_steps=5,
                        max_steps=40, eval_every=40, save_every=40, seed=0, device="cpu"))
    return root


def config(root, out, **changes):
    return RewardModelConfig(**{**dict(base=str(root / "bert"), prefs=str(root / "prefs.jsonl"), out=str(out),
                                       max_len=48, max_steps=80, lr=3e-3, seed=0, device="cpu", eval_every=40),
                                **changes})


def test_a_bert_reward_model_ranks_unseen_pairs_and_scores_from_its_cls_vector(bert_base, tmp_path):
    train_reward_model(config(bert_base, tmp_path / "rm"))
    rm = load_reward_model(tmp_path / "rm", device="cpu")
    unseen = rows(60, seed=1)   # prompts ("friend number i") and reply pairs drawn afresh
    right = sum(rm.rewards([(r["prompt"], r["chosen"][0]["content"])])[0] >
                rm.rewards([(r["prompt"], r["rejected"][0]["content"])])[0] for r in unseen)
    assert right / len(unseen) >= 0.8, f"{right} of {len(unseen)} ranked right (chance is half)"

    # by hand: [CLS] prompt [SEP] reply [SEP], the head's weights times the last [CLS] state, normalised
    tok = rm.tokenizer
    prompt = [{"role": "user", "content": "What should I drink, friend number 7?"}]
    ids = [tok.token_id("[CLS]"), *tok.encode(prompt[0]["content"], add_special_tokens=False), tok.token_id("[SEP]"),
           *tok.encode("Maybe a cup of tea?", add_special_tokens=False), tok.token_id("[SEP]")]
    with torch.no_grad():
        cls_state = rm.model.backbone.hidden_states(torch.tensor([ids]))[0, 0]
        raw = float(cls_state @ rm.model.score.weight[0])
    assert rm.rewards([(prompt, "Maybe a cup of tea?")])[0] == pytest.approx(
        (raw - rm.model.offset) / rm.model.scale, abs=1e-5)
    assert rm.model.scale != 1.0 and rm.config["architectures"] == ["ParleyBertForSequenceClassification"]

    # parley score reads it as any reward model
    (tmp_path / "score.jsonl").write_text(json.dumps({"prompt": prompt[0]["content"],
                                                      "response": "Maybe a cup of tea?"}) + "\n")
    [row] = score_file(str(tmp_path / "rm"), str(tmp_path / "score.jsonl"), "cpu")
    assert row["response"] == pytest.approx(rm.rewards([(prompt, "Maybe a cup of tea?")])[0], abs=1e-6)


def test_bert_reward_model_refusals_are_one_line(bert_base, tmp_path):
    with pytest.raises(ParleyError, match="--max-len 64 and \\[CLS\\] are more than this BERT's 64 positions"):
        train_reward_model(config(bert_base, tmp_path / "x", max_len=64))
    with pytest.raises(ParleyError, match="a BERT reward model trains whole: drop --lora-r"):
        train_reward_model(config(bert_base, tmp_path / "x", lora_r=4))
    rm = train_reward_model(config(bert_base, tmp_path / "rm", max_steps=2))
    with pytest.raises(ParleyError, match="no value per position for PPO's critic"):
        rm.model(*rm.batch([[5, 6, 7]]), every_position=True)
