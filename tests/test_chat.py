"""The app's engine API: replies stream into the store, with context truncation and control."""
import pytest

import engine
from engine import ParleyError
from engine.chat import Replies, prompt_ids
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
