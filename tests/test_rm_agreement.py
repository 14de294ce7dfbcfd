"""How often a reward model orders the user's ranked pairs as the user did: the share on a hand-made
store with known scores, the held-out exclusion, the ranking-level bootstrap, and `parley arena
--reward-model` on a real (tiny) reward model."""
import json

import numpy as np
import pytest
from helpers import make_reward_model

from engine.arena import ArenaConfig, agreement, agreement_candidates
from engine.rlhf.prefs import preference_groups
from engine.store import Store


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "parley.db") as s:
        yield s


def ranked(store, ranks_by_text, vote=None, best=None):
    """A comparison of replies named by their texts, ranked {text: rank} (or voted); returns
    ({text: message id}, ranking id)."""
    c = store.create_conversation("rm")
    u = store.add_message(c, "user", "Hi")
    ids = {t: store.add_message(c, "assistant", t, u, make_current=False) for t in ranks_by_text}
    comparison = store.create_comparison(c, u, list(ids.values()))
    if vote:
        return ids, store.vote(comparison, vote, best=ids.get(best))
    return ids, store.rank(comparison, {ids[t]: r for t, r in ranks_by_text.items()})


def test_agreement_counts_the_pairs_the_scores_order_as_the_user_did(store):
    # ranking 1: a > b > c; scores order a > c > b: pairs (a,b) yes, (a,c) yes, (b,c) no -> 2 of 3
    one, _ = ranked(store, {"a": 1, "b": 2, "c": 3})
    # ranking 2: d > e = f: the tie is left out; scores d < e, d = f (the reward model's tie: half) -> 0.5 of 2
    two, _ = ranked(store, {"d": 1, "e": 2, "f": 2})
    # a "best" vote of three: best over each other, runners-up unjudged -> g > h yes, g > i yes: 2 of 2
    three, _ = ranked(store, {"g": 0, "h": 0, "i": 0}, vote="best", best="g")
    # a "tie" vote: no pair at all
    ranked(store, {"j": 0, "k": 0}, vote="tie")
    scores = {one["a"]: 3.0, one["b"]: 1.0, one["c"]: 2.0, two["d"]: 0.0, two["e"]: 1.0, two["f"]: 0.0,
              three["g"]: 5.0, three["h"]: -1.0, three["i"]: 9.0 - 9.0}
    result = agreement(store, scores, set(), ArenaConfig(rounds=2000))
    assert result.pairs == 7 and result.rankings == 3 and result.trained == 0 and result.unscored == 0
    assert result.share == pytest.approx((2 + 0.5 + 2) / 7)
    # the interval resamples whole rankings: (agreeing, pairs) = (2, 3), (0.5, 2), (2, 2)
    rng = np.random.default_rng(0)
    agree, pairs = np.array([2, 0.5, 2]), np.array([3, 2, 2])
    draws = rng.integers(0, 3, size=(2000, 3))
    low, high = np.percentile(agree[draws].sum(1) / pairs[draws].sum(1), [2.5, 97.5])
    assert (result.low, result.high) == pytest.approx((low, high))
    assert result.low < result.share < result.high
    assert "64% of pairs" in result.line and "7 pairs from 3 rankings" in result.line


def test_held_out_agreement_leaves_out_the_rankings_the_reward_model_trained_on(store):
    good, trained_id = ranked(store, {"good": 1, "bad": 2})
    other, _ = ranked(store, {"x": 1, "y": 2})
    scores = {good["good"]: 1.0, good["bad"]: 0.0, other["x"]: 0.0, other["y"]: 1.0}
    held_out = agreement(store, scores, {trained_id})
    assert (held_out.share, held_out.pairs, held_out.trained) == (0.0, 1, 1)
    assert set(agreement_candidates(store, {trained_id})) == set(other.values())
    everything = agreement(store, scores, None)   # a reward model that records no training rankings
    assert (everything.share, everything.pairs, everything.trained) == (0.5, 2, None)
    assert "not known to be held out" in everything.line
    # a candidate the reward model cannot score (too long) leaves its pairs out, counted
    partial = agreement(store, {**scores, other["y"]: None}, set())
    assert (partial.pairs, partial.unscored, partial.share) == (1, 1, 1.0)
    assert agreement(store, {}, set()).share is None


def test_a_store_trained_reward_model_records_the_rankings_it_trained_on(store):
    _, rid = ranked(store, {"a": 1, "b": 2, "c": 3})
    groups = preference_groups("store", store)
    assert [g["rankings"] for g in groups] == [[rid]] and len(groups[0]["pairs"]) == 3


def fill_home(tmp_path, monkeypatch):
    """PARLEY_HOME with two rankings: one the reward model trained on, one held out."""
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    with Store() as s:
        c = s.create_conversation("rm")
        u = s.add_message(c, "user", "What should I drink?")
        texts = ["Tea is nice today.", "Maybe a cup of juice?", "I would have some water.", "Hello there!"]
        ids = [s.add_message(c, "assistant", t, u, make_current=False, model="tiny",
                             settings={"temperature": 0.3 * (i + 1)}) for i, t in enumerate(texts)]
        trained = s.rank(s.create_comparison(c, u, ids[:2]), {ids[0]: 1, ids[1]: 2})
        s.rank(s.create_comparison(c, u, ids), {ids[0]: 1, ids[1]: 2, ids[2]: 3, ids[3]: 4})
    return texts, trained


def test_parley_arena_with_a_reward_model_prints_its_held_out_agreement(checkpoints, tmp_path, monkeypatch, capsys):
    from engine.cli import main
    texts, trained = fill_home(tmp_path, monkeypatch)
    rm = make_reward_model(checkpoints("qwen2")[0], tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**config, "parley_trained_rankings": [trained]}))
    prompt = [{"role": "user", "content": "What should I drink?"}]
    scores = rm.rewards([(prompt, t) for t in texts])
    expected = sum(scores[i] > scores[j] for i in range(4) for j in range(i + 1, 4)) / 6   # the held-out ranking
    assert main(["arena", "--rounds", "100", "--reward-model", str(tmp_path / "rm"), "--device", "cpu"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"reward model agrees with your rankings on {100 * expected:.0f}% of pairs")
    assert "6 pairs from 1 rankings" in last and "held out" in last
    assert main(["arena", "--rounds", "100", "--json", "--reward-model", str(tmp_path / "rm"), "--device", "cpu"]) == 0
    found = json.loads(capsys.readouterr().out.splitlines()[-1])["agreement"]
    assert found["share"] == pytest.approx(expected, abs=1e-4) and found["pairs"] == 6 and found["trained"] == 1
    assert main(["arena", "--reward-model", str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_parley_train_rm_from_the_store_writes_the_rankings_it_trained_on(checkpoints, store, tmp_path):
    from engine.rlhf.prefs import split_by_prompt
    from engine.rlhf.reward_model import (
        load_reward_model,
        train_reward_model,
        trained_rankings,
    )
    from engine.train.config import RewardModelConfig
    by_prompt = {}
    for i in range(40, 50):   # friends 44 and 47 are in data.held_out's fixed split
        c = store.create_conversation("rm")
        u = store.add_message(c, "user", f"What should I drink, friend {i}?")
        a, b = (store.add_message(c, "assistant", t, u, make_current=False) for t in ("Tea.", "Juice."))
        by_prompt[f"What should I drink, friend {i}?"] = store.rank(store.create_comparison(c, u, [a, b]), {a: 1, b: 2})
    train, heldout = split_by_prompt(preference_groups("store", store))
    assert heldout and heldout is not train   # both halves: some rankings stay out of training
    train_reward_model(RewardModelConfig(base=str(checkpoints("qwen2")[0]), prefs="store", out=str(tmp_path / "rm"),
                                         max_steps=1, device="cpu", normalise_samples=2, max_new_tokens=4), store)
    recorded = trained_rankings(load_reward_model(tmp_path / "rm", "cpu"))
    expected = {by_prompt[g["prompt"][-1]["content"]] for g in train}
    assert recorded == expected and len(recorded) == 8
