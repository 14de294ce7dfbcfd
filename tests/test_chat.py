"""The app's engine API: replies stream into the store, with context truncation and control."""
import math
from dataclasses import replace

import pytest

import engine
from engine import ParleyError
from engine.chat import Replies, continue_from, prompt_ids, replay
from engine.settings import Settings
from engine.store import Store

GREEDY = dict(temperature=0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture
def setup(checkpoints, tmp_path):
    path, _ = checkpoints("qwen2")
    lm = engine.load(path, device="cpu")
    store = Store(tmp_path / "parley.db")
    c = store.create_conversation("t", "Be brief.")
    u = store.add_message(c, "user", "Hello there!")
    yield lm, store, c, u
    store.close()


def test_reply_streams_into_the_store(setup):
    lm, store, c, u = setup
    replies = Replies(lm, store, c, u, [Settings(**GREEDY, max_new_tokens=8)], model_name="tiny")
    assert store.message(replies.message_ids[0])["status"] == "partial"
    events = list(replies)
    final = events[-1].finished
    m = store.message(replies.message_ids[0])
    assert (m["status"], m["content"], m["finish_reason"]) == ("complete", final.text, final.finish_reason)
    assert m["settings"]["temperature"] == 0 and m["completion_tokens"] == len(final.token_ids)
    assert m["model"] == "tiny" and m["timings"]["decode_tokens_per_s"] > 0
    assert store.conversation(c)["current_leaf"] == m["id"]
    assert "".join(e.token.text for e in events if e.token) == final.text


def test_candidates_become_a_comparison_and_a_ranking_gives_pairs(setup):
    lm, store, c, u = setup
    replies = Replies(lm, store, c, u, [Settings(seed=i, max_new_tokens=5) for i in range(3)])
    list(replies)
    comparison = store.comparison(replies.comparison_id)
    assert [m["id"] for m in comparison["candidates"]] == replies.message_ids
    a, b, d = replies.message_ids
    store.rank(replies.comparison_id, {a: 1, b: 2, d: 3})
    assert len(store.preference_pairs()) == 3


def test_cancelled_reply_is_kept_and_marked(setup):
    lm, store, c, u = setup
    replies = Replies(lm, store, c, u, [Settings(seed=1, max_new_tokens=50)])
    for event in replies:
        if event.token and event.token.step == 3:
            replies.cancel()
    m = store.message(replies.message_ids[0])
    assert m["finish_reason"] == "cancelled" and m["completion_tokens"] == 4
    assert len(store.reply_tokens(m["id"])["tokens"]) == 4
    assert replay(lm, store, m["id"]).token_ids == [t["token_id"] for t in store.reply_tokens(m["id"])["tokens"]]


def test_oldest_turns_are_dropped_to_fit_and_the_system_prompt_stays(setup):
    lm, store, c, u = setup
    lm.config["max_position_embeddings"] = 120
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(10):
        messages += [{"role": "user", "content": f"question number {i} about the sea"},
                     {"role": "assistant", "content": f"answer number {i} about the sea"}]
    messages.append({"role": "user", "content": "last"})
    ids, dropped = prompt_ids(lm, messages, 20)
    assert dropped > 0 and len(ids) + 20 <= 120
    assert ids == lm.tokenizer.encode_chat(messages[:1] + messages[1 + dropped:])
    with pytest.raises(ParleyError, match="the last message alone is"):
        prompt_ids(lm, messages[:1] + [{"role": "user", "content": "sea " * 400}], 20)


def test_reply_needs_a_user_message(setup):
    lm, store, c, u = setup
    a = store.add_message(c, "assistant", "Hi.")
    with pytest.raises(ParleyError, match="needs a user message"):
        Replies(lm, store, c, a, [Settings()])


def test_a_candidate_can_have_a_model_of_its_own(setup, checkpoints):
    from engine.generate import generate
    lm, store, c, u = setup
    other = engine.load(checkpoints("llama_gqa_untied")[0], device="cpu")
    settings = Settings(**GREEDY, max_new_tokens=6, min_new_tokens=6)
    replies = Replies(lm, store, c, u, [settings, settings, settings], model_name="tiny",
                      models=[None, (other, "other"), None])
    events = list(replies)
    texts = {e.candidate: e.finished.text for e in events if e.finished}
    messages = store.prompt_messages(c, u)
    alone = {name: generate(m, prompt_ids(m, messages, 6)[0], settings)[0].text for name, m in (("tiny", lm),
                                                                                              ("other", other))}
    assert texts == {0: alone["tiny"], 1: alone["other"], 2: alone["tiny"]}
    assert [store.message(m)["model"] for m in replies.message_ids] == ["tiny", "other", "tiny"]
    assert {e.candidate for e in events[:6] if e.token} == {0, 1, 2}   # the two models stream together
    assert store.comparison(replies.comparison_id)["candidates"][1]["model"] == "other"


def stream(replies, changes=None):
    """Run `replies`; `changes` {step: settings}: candidate 0's settings changed while token `step` streams."""
    done = {}
    for event in replies:
        if event.finished:
            done[event.candidate] = event.finished
        elif event.candidate == 0 and event.token.step in (changes or {}):
            replies.update(0, changes[event.token.step])
    return done


def ids_of(store, message_id):
    return [t["token_id"] for t in store.reply_tokens(message_id)["tokens"]]


def test_every_candidate_keeps_its_tokens_and_alternatives(setup):
    lm, store, c, u = setup
    sampled = Settings(temperature=0.9, top_k=2, top_p=1.0, min_p=0.0, seed=4, max_new_tokens=12)
    replies = Replies(lm, store, c, u, [sampled, Settings(**GREEDY, num_beams=2, max_new_tokens=6)])
    done = stream(replies)
    stored = store.reply_tokens(replies.message_ids[0])
    assert stored["forced"] == 0 and ids_of(store, replies.message_ids[0]) == done[0].token_ids
    tokens = stored["tokens"]
    assert "".join(t["text"] for t in tokens) == store.message(replies.message_ids[0])["content"]
    assert [t["step"] for t in tokens] == list(range(12))
    for t in tokens:
        assert t["piece"] == lm.tokenizer.decode([t["token_id"]], skip_special_tokens=False)
        assert len(t["before"]) == 5 and 1 <= len(t["after"]) <= 2        # top-k 2: no zero-probability rows
        assert t["token_id"] in [a["token_id"] for a in t["after"]]
        assert t["sampled_logprob"] == pytest.approx(math.log(next(a["prob"] for a in t["after"]
                                                                   if a["token_id"] == t["token_id"])), abs=1e-3)
    beam = store.reply_tokens(replies.message_ids[1])      # beams stream nothing: their ids are kept
    assert [t["token_id"] for t in beam["tokens"]] == done[1].token_ids
    m = store.message(replies.message_ids[0])
    assert m["segments"] == [{"from": 0, "settings": m["settings"]}] and m["settings"]["seed"] == 4


HOT = Settings(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0, seed=11, max_new_tokens=16)
COOL = Settings(temperature=0.2, top_k=3, top_p=1.0, min_p=0.0, seed=11, max_new_tokens=16)


def test_a_reply_changed_mid_stream_is_stored_as_segments_and_replays_exactly(setup):
    lm, store, c, u = setup
    replies = Replies(lm, store, c, u, [HOT])
    done = stream(replies, {4: COOL})          # changed after its 5th token
    mid = replies.message_ids[0]
    m = store.message(mid)
    assert m["settings"]["temperature"] == 1.3                        # what it started with
    assert [(s["from"], s["settings"]["temperature"], s["settings"]["top_k"]) for s in m["segments"]] == \
        [(0, 1.3, 0), (5, 0.2, 3)]
    assert replay(lm, store, mid).token_ids == done[0].token_ids == ids_of(store, mid)
    with store.transaction():
        store.conn.execute("UPDATE messages SET segments = NULL WHERE id = ?", [mid])
    assert replay(lm, store, mid).token_ids != done[0].token_ids    # the segments are what replays it


def test_a_reply_continues_from_an_alternative_token(setup):
    lm, store, c, u = setup
    source = Replies(lm, store, c, u, [HOT])
    stream(source, {2: COOL})
    sid = source.message_ids[0]
    tokens = store.reply_tokens(sid)["tokens"]
    other = next(a for a in tokens[6]["before"] if a["token_id"] != tokens[6]["token_id"])
    cont = continue_from(store, sid, 6, other["token_id"])
    parent, forced, settings = cont
    assert parent == u and forced == ids_of(store, sid)[:6] + [other["token_id"]]
    assert settings == COOL                                            # in force at token 6, seed included
    assert continue_from(store, sid, 1, 0).settings == HOT

    replies = Replies(lm, store, c, parent, [settings], forced=forced, forced_tokens=cont.tokens)
    done = stream(replies, {9: replace(HOT, temperature=1.0)})
    mid = replies.message_ids[0]
    assert [m["id"] for m in store.siblings(sid)] == [sid, mid]
    stored = store.reply_tokens(mid)
    assert stored["forced"] == 7 and ids_of(store, mid) == forced + done[0].token_ids
    assert stored["tokens"][:6] == tokens[:6]                             # the kept tokens as they were
    assert stored["tokens"][6]["before"] == tokens[6]["before"]          # the same distribution there
    assert stored["tokens"][6]["logprob"] == pytest.approx(math.log(other["prob"]), abs=1e-3)
    text = lm.tokenizer.decode(forced)
    m = store.message(mid)
    assert m["content"] == text + done[0].text and m["content"] == "".join(t["text"] for t in stored["tokens"])
    assert [(s["from"], s["settings"]["temperature"]) for s in m["segments"]] == [(7, 0.2), (10, 1.0)]
    prompt = prompt_ids(lm, store.prompt_messages(c, u), 16)[0]
    from engine.generate import generate
    assert generate(lm, prompt + forced, settings)[0].token_ids[:3] == done[0].token_ids[:3]
    assert replay(lm, store, mid).token_ids == done[0].token_ids
    with store.transaction():
        store.conn.execute("UPDATE messages SET segments = NULL WHERE id = ?", [mid])
    assert replay(lm, store, mid).token_ids != done[0].token_ids


def test_bad_continuations(setup):
    lm, store, c, u = setup
    hand = store.add_message(c, "assistant", "written by hand", u)
    with pytest.raises(ParleyError, match="has no stored tokens"):
        replay(lm, store, hand)
    replies = Replies(lm, store, c, u, [Settings(**GREEDY, max_new_tokens=3)])
    list(replies)
    with pytest.raises(ParleyError, match=r"step 3 is not a token of reply .*: it has tokens 0 to 2"):
        continue_from(store, replies.message_ids[0], 3, 5)
    with pytest.raises(ParleyError, match="forced token -1 is not a token id of this model"):
        Replies(lm, store, c, u, [Settings()], forced=[5, -1])
    with pytest.raises(ParleyError, match="forced_tokens must be the records of the forced tokens"):
        Replies(lm, store, c, u, [Settings()], forced=[5, 6], forced_tokens=[{"token_id": 5}])
