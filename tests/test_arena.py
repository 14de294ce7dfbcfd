"""The arena's Bradley–Terry ratings: the fit against hand-solved tables and a numerical optimiser,
ties, the bootstrap intervals, and the battles read from a store filled through its own API."""
import dataclasses
import json
import math

import numpy as np
import pytest

from engine import ParleyError
from engine.arena import (
    SCALE,
    ArenaConfig,
    Battle,
    Preset,
    battles,
    changed_settings,
    fit,
    rate,
    ratings,
    table,
)
from engine.settings import Settings
from engine.store import Store

A, B, C, D = (Preset(None, name) for name in "ABCD")
MLE = ArenaConfig(virtual_ties=0, rounds=200)   # the plain maximum likelihood


def fights(*spec):
    """fights((A, B, 2, 1, 0)): A beat B twice, lost once, tied none."""
    out = []
    for a, b, won, lost, tied in spec:
        out += [Battle(a, b, 1.0)] * won + [Battle(a, b, 0.0)] * lost + [Battle(a, b, 0.5)] * tied
    return out


def by_label(rows):
    return {r.preset.label: r for r in rows}


def by_model(rows):
    return {r.preset.model: r for r in rows}


def test_three_presets_whose_odds_agree_fit_their_closed_form():
    # strengths 4 : 2 : 1 give every pair exactly its observed win share (2 of 3, 2 of 3, 4 of 5), so the
    # likelihood equations hold at θ = ln(4, 2, 1): mean-anchored, 1000 ± 400·log10(2)
    rows = rate(fights((A, B, 2, 1, 0), (B, C, 2, 1, 0), (A, C, 4, 1, 0)), MLE)
    assert [r.preset for r in rows] == [A, B, C] and [r.rank for r in rows] == [1, 2, 3]
    step = 400 * math.log10(2)
    assert [r.rating for r in rows] == pytest.approx([1000 + step, 1000, 1000 - step], abs=1e-6)
    assert [r.battles for r in rows] == [8, 6, 8]
    assert [r.win_rate for r in rows] == pytest.approx([6 / 8, 3 / 6, 2 / 8])


def test_a_cycle_rates_everyone_the_same():
    rows = rate(fights((A, B, 1, 0, 0), (B, C, 1, 0, 0), (C, A, 1, 0, 0)), MLE)
    assert [r.rating for r in rows] == pytest.approx([1000] * 3, abs=1e-6)


def test_fit_matches_a_numerical_optimiser_on_a_random_table():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(3)
    wins = rng.integers(0, 6, size=(5, 5)).astype(float) + rng.integers(0, 2, size=(5, 5)) * 0.5
    np.fill_diagonal(wins, 0)
    for virtual_ties in (0.0, 1.0, 3.0):
        def nll(t, virtual_ties=virtual_ties):
            d = t[:, None] - t[None, :]
            return ((wins * np.logaddexp(0, -d)).sum()
                    + virtual_ties * 0.5 * (np.logaddexp(0, -t) + np.logaddexp(0, t)).sum())
        reference = optimize.minimize(nll, np.zeros(5), method="BFGS", options={"gtol": 1e-10}).x
        theta = fit(wins, virtual_ties)
        assert theta - theta.mean() == pytest.approx(reference - reference.mean(), abs=1e-5)
        assert nll(theta) <= nll(reference) + 1e-9


def test_ties_count_as_half_a_win_for_each_side():
    # A beat B 3 times and they tied twice: A has 4 of the 5 wins, odds 4:1
    tied = by_model(rate(fights((A, B, 3, 0, 2)), MLE))
    assert tied["A"].rating - tied["B"].rating == pytest.approx(400 * math.log10(4))
    assert tied["A"].win_rate == pytest.approx(4 / 5) and tied["A"].battles == 5
    # the same two battles as losses of A: odds 3:2; as wins of A, or left out: A never lost
    lost = by_model(rate(fights((A, B, 3, 2, 0)), MLE))
    assert lost["A"].rating - lost["B"].rating == pytest.approx(400 * math.log10(1.5))
    for unbeaten in (fights((A, B, 5, 0, 0)), fights((A, B, 3, 0, 0))):
        with pytest.raises(ParleyError, match="no finite maximum"):
            rate(unbeaten, MLE)


def test_virtual_ties_give_an_unbeaten_preset_a_finite_rating_that_grows_with_its_wins():
    one = by_model(rate(fights((A, B, 1, 0, 0)), ArenaConfig(rounds=50)))
    ten = by_model(rate(fights((A, B, 10, 0, 0)), ArenaConfig(rounds=50)))
    assert 1000 < one["A"].rating < ten["A"].rating < math.inf
    assert one["A"].rating + one["B"].rating == pytest.approx(2000)   # mean-anchored
    # two virtual half-wins per side of (θ, 0): the fit solves 1 - σ(2θ) = σ(θ) - 1/2 with θA = -θB = θ
    theta = (one["A"].rating - 1000) / SCALE
    assert 1 - 1 / (1 + math.exp(-2 * theta)) == pytest.approx(1 / (1 + math.exp(-theta)) - 0.5)


def test_anchor_puts_a_named_preset_at_1000():
    f = fights((A, B, 2, 1, 0), (B, C, 2, 1, 0), (A, C, 4, 1, 0))
    rows = by_model(rate(f, dataclasses.replace(MLE, anchor="C")))
    assert rows["C"].rating == pytest.approx(1000) and rows["C"].low == rows["C"].high == pytest.approx(1000)
    assert rows["A"].rating == pytest.approx(1000 + 400 * math.log10(4))
    with pytest.raises(ParleyError, match="--anchor 'E' is no preset"):
        rate(f, dataclasses.replace(MLE, anchor="E"))


def test_bootstrap_intervals_hold_the_estimate_shrink_with_more_data_and_repeat():
    base = ((A, B, 3, 2, 1), (B, C, 3, 1, 1), (A, C, 4, 1, 0), (C, D, 2, 2, 1), (A, D, 3, 1, 0))
    small = rate(fights(*base))
    large = rate(fights(*[(a, b, 10 * w, 10 * l, 10 * t) for a, b, w, l, t in base]))
    for r in small + large:
        assert r.low < r.rating < r.high
    small, large = by_model(small), by_model(large)
    for name in "ABCD":
        assert large[name].high - large[name].low < 0.6 * (small[name].high - small[name].low)
    again = by_model(rate(fights(*base)))
    assert [(again[n].low, again[n].high) for n in "ABCD"] == [(small[n].low, small[n].high) for n in "ABCD"]
    other = by_model(rate(fights(*base), ArenaConfig(seed=1)))
    assert [other[n].low for n in "ABCD"] != [small[n].low for n in "ABCD"]


def test_a_preset_missing_from_a_resample_adds_nothing_to_its_interval():
    # E lost its one battle: about a third of the resamples leave it out, and those say nothing of it
    # (its prior alone would put it near the mean); in the others it only lost, so it is below the mean
    rows = by_model(rate(fights((A, B, 10, 8, 2), (B, C, 9, 7, 1), (A, C, 12, 6, 0), (D, A, 0, 1, 0))))
    assert rows["D"].low < rows["D"].rating < rows["D"].high < 1000 and rows["D"].battles == 1


def test_no_battles_no_table_and_bad_config_is_one_line():
    assert rate([]) == []
    with pytest.raises(ParleyError, match="--by 'pane'"):
        rate(fights((A, B, 1, 1, 0)), ArenaConfig(by="pane"))
    with pytest.raises(ParleyError, match="--rounds 0"):
        rate(fights((A, B, 1, 1, 0)), ArenaConfig(rounds=0))
    with pytest.raises(ParleyError, match="--seed -1"):
        rate(fights((A, B, 1, 1, 0)), ArenaConfig(seed=-1))


def test_changed_settings_are_canonical_and_leave_the_seed_out():
    full = Settings(temperature=0.3, top_k=20, seed=7).to_dict()
    assert changed_settings(full) == '{"temperature":0.3,"top_k":20}'
    assert changed_settings({**full, "seed": 8, "top_p": 1}) == '{"temperature":0.3,"top_k":20,"top_p":1.0}'
    assert changed_settings(Settings(seed=3).to_dict()) == "{}"


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "parley.db") as s:
        yield s


def reply(store, conversation, parent, text, model="tiny", **settings):
    return store.add_message(conversation, "assistant", text, parent, model=model,
                             settings=Settings(**settings).to_dict(), make_current=False)


def test_battles_from_a_ranked_store(store):
    c = store.create_conversation("arena")
    u = store.add_message(c, "user", "Hi")
    cold, warm, hot = (reply(store, c, u, t, temperature=x, seed=i) for i, (t, x) in
                       enumerate([("cold", 0.3), ("warm", 0.7), ("hot", 1.3)]))
    warm_again = reply(store, c, u, "warm again", temperature=0.7, seed=9)   # the same preset, another seed
    other_model = reply(store, c, u, "other", model="big", temperature=0.3)
    # a ranking of four with a tie: C(4, 2) = 6 pairs, less the one between two warm candidates
    store.rank(store.create_comparison(c, u, [cold, warm, hot, warm_again]), {cold: 1, warm: 2, hot: 2, warm_again: 3})
    # a "best" vote of three: best over each, the two runners-up unjudged
    store.vote(store.create_comparison(c, u, [hot, cold, other_model]), "best", best=hot)
    store.vote(store.create_comparison(c, u, [cold, hot]), "tie")
    store.rank(store.create_comparison(c, u, [cold, other_model]), {cold: 2, other_model: 1})
    cold_p, warm_p, hot_p = (Preset(f'{{"temperature":{x}}}', "tiny") for x in (0.3, 0.7, 1.3))
    big_p = Preset('{"temperature":0.3}', "big")
    assert battles(store) == [
        Battle(cold_p, warm_p, 1.0), Battle(cold_p, hot_p, 1.0), Battle(cold_p, warm_p, 1.0),
        Battle(warm_p, hot_p, 0.5), Battle(hot_p, warm_p, 1.0),
        Battle(hot_p, cold_p, 1.0), Battle(hot_p, big_p, 1.0),
        Battle(cold_p, hot_p, 0.5), Battle(cold_p, big_p, 0.0)]
    # by settings alone the two temperature-0.3 candidates are one preset: their ranking is no battle
    cold_s, hot_s = Preset('{"temperature":0.3}', None), Preset('{"temperature":1.3}', None)
    by_settings = battles(store, "settings")
    assert len(by_settings) == 8 and by_settings[6] == Battle(hot_s, cold_s, 1.0)
    # by model alone only the pairs with "big" are battles
    tiny, big = Preset(None, "tiny"), Preset(None, "big")
    assert battles(store, "model") == [Battle(tiny, big, 1.0), Battle(tiny, big, 0.0)]
    rows = ratings(store, ArenaConfig(rounds=100))
    assert {r.preset.label for r in rows} == {"temperature=0.3 @ tiny", "temperature=0.7 @ tiny",
                                             "temperature=1.3 @ tiny", "temperature=0.3 @ big"}
    assert sum(r.battles for r in rows) == 2 * 9
    assert by_label(rows)["temperature=0.7 @ tiny"].win_rate == pytest.approx(0.5 / 4)   # one tie in four
    assert table(rows).splitlines()[0].split() == ["rank", "preset", "rating", "95%", "CI", "battles", "win", "rate"]
    assert len(table(rows).splitlines()) == 5


def test_a_preset_without_battles_is_absent(store):
    c = store.create_conversation("arena")
    u = store.add_message(c, "user", "Hi")
    x, y = reply(store, c, u, "x", temperature=0.3, seed=1), reply(store, c, u, "y", temperature=0.3, seed=2)
    z, w = reply(store, c, u, "z", temperature=0.3, seed=3), reply(store, c, u, "w", temperature=1.3)
    lone = reply(store, c, u, "lone", temperature=0.9)
    store.rank(store.create_comparison(c, u, [x, y]), {x: 1, y: 2})     # one preset against itself
    store.rank(store.create_comparison(c, u, [z, w]), {z: 1, w: 2})
    store.create_comparison(c, u, [lone, w])                             # never ranked
    assert [r.preset.label for r in ratings(store, ArenaConfig(rounds=20))] == ["temperature=0.3 @ tiny",
                                                                                "temperature=1.3 @ tiny"]


def test_replies_without_a_preset_are_left_out(store):
    c = store.create_conversation("arena")
    u = store.add_message(c, "user", "Hi")
    known = reply(store, c, u, "known", temperature=0.3)
    unknown = store.add_message(c, "assistant", "imported", u, make_current=False)   # no settings, no model
    store.rank(store.create_comparison(c, u, [known, unknown]), {known: 1, unknown: 2})
    assert battles(store) == [] and ratings(store) == []


def ranked_home(tmp_path, monkeypatch):
    """PARLEY_HOME with a store where temperature 0.3 beat 1.3 three times and lost once."""
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path))
    with Store() as s:
        c = s.create_conversation("arena")
        u = s.add_message(c, "user", "Hi")
        for cold_won in (True, True, False, True):
            cold, hot = reply(s, c, u, "cold", temperature=0.3), reply(s, c, u, "hot", temperature=1.3)
            s.vote(s.create_comparison(c, u, [cold, hot]), "best", best=cold if cold_won else hot)


def test_parley_arena_prints_the_table(tmp_path, monkeypatch, capsys):
    from engine.cli import main
    ranked_home(tmp_path, monkeypatch)
    assert main(["arena", "--rounds", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "preset", "rating", "95%", "CI", "battles", "win", "rate"]
    first, second = lines[1].split(), lines[2].split()
    assert first[:4] == ["1", "temperature=0.3", "@", "tiny"] and first[-2:] == ["4", "75%"]
    assert second[:4] == ["2", "temperature=1.3", "@", "tiny"] and second[-2:] == ["4", "25%"]
    assert int(first[4]) + int(second[4]) == 2000 and int(first[4]) > 1000
    assert lines[3].startswith("4 battles;") and "mean rating 1000" in lines[3] and len(lines) == 4

    assert main(["arena", "--rounds", "100", "--json", "--by", "settings"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["rank"], r["preset"], r["settings"], r["model"], r["battles"]) for r in rows] == [
        (1, "temperature=0.3", {"temperature": 0.3}, None, 4), (2, "temperature=1.3", {"temperature": 1.3}, None, 4)]
    assert rows[0]["ci_low"] < rows[0]["rating"] < rows[0]["ci_high"]

    assert main(["arena", "--rounds", "100", "--anchor", "temperature=1.3 @ tiny"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[4] == "1000"
    assert main(["arena", "--anchor", "temperature=2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("parley: error: --anchor 'temperature=2' is no preset") and err.count("\n") == 1


def test_parley_arena_on_an_empty_store_says_so(tmp_path, monkeypatch, capsys):
    from engine.cli import main
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path))
    assert main(["arena"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no battles yet") and out.count("\n") == 1
    assert main(["arena", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("no battles yet")
