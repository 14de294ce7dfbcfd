"""`parley serve`: a real server on a free localhost port, driven by the official openai client."""
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import openai
import pytest

import engine
from engine.cli import main
from engine.errors import ParleyError
from engine.generate import Finished, Generation, Token, generate
from engine.serve.app import ServeConfig, Server
from engine.serve.batcher import Batcher, Job
from engine.settings import Settings
from engine.store import Store

HELLO = [{"role": "user", "content": "Hello there! How are you?"}]
# what a request that names no setting means (OpenAI's defaults), plus the fields a test sets
PLAIN = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)


@pytest.fixture(scope="module")
def lm(checkpoints):
    return engine.load(checkpoints("llama_gqa_untied")[0], device="cpu", decode_only=True)   # as parley serve loads it


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("home")
        mp.setenv("PARLEY_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def server(lm, home):
    srv = Server({"tiny": lm}, ServeConfig(port=0)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, bytes]:
    """A raw request (status, body): what the openai client hides (the event lines, refusals)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json", **(headers or {})},
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def alone(lm, messages, **settings):
    """What the engine gives the same prompt and settings on its own."""
    return generate(lm, lm.tokenizer.encode_chat(messages), Settings(**{**PLAIN, **settings}))[0]


def wait_for(condition, what: str, limit_s: float = 20.0):
    """Wait for the server's threads (engine, store log) to get somewhere; a limit, not a timing."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def test_models_lists_what_is_served(client, lm):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_completion_is_the_engines_reply_with_its_usage(client, lm):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, seed=7, temperature=0.9)
    expected = alone(lm, HELLO, max_new_tokens=12, seed=7, temperature=0.9)
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[expected.finish_reason]
    prompt = len(lm.tokenizer.encode_chat(HELLO))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (prompt, len(expected.token_ids), prompt + len(expected.token_ids))


def test_parley_settings_go_in_as_extra_fields(client, lm):
    extra = dict(top_k=5, min_p=0.1, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=10)
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, seed=3,
                                           frequency_penalty=0.5, presence_penalty=0.3, extra_body=extra)
    expected = alone(lm, HELLO, max_new_tokens=10, seed=3, frequency_penalty=0.5, presence_penalty=0.3, **extra)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.content != alone(lm, HELLO, max_new_tokens=10, seed=3).text


def test_stream_adds_up_to_the_reply_and_ends_with_done(client, server, lm):
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=15, seed=11, stream=True,
                                                 stream_options={"include_usage": True}))
    expected = alone(lm, HELLO, max_new_tokens=15, seed=11)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    # the raw events: every line a data: line, the last one [DONE]
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "stream": True, "seed": 1}
    status, raw = post(server.url + "/completions", body)
    events = [line for line in raw.decode().split("\n") if line]
    assert status == 200
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    texts = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    completion = generate(lm, lm.tokenizer.encode("Hello"), Settings(**PLAIN, max_new_tokens=4, seed=1))[0]
    assert texts == completion.text


def test_n_choices_are_seeded_seed_plus_i(client, lm):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, seed=40, n=3)
    texts = [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]
    assert texts == [alone(lm, HELLO, max_new_tokens=8, seed=40 + i).text for i in range(3)]
    assert len(set(texts)) == 3
    assert reply.usage.completion_tokens == 24


def test_logprobs_are_the_models(client, lm):
    import torch
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, seed=5, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    ids = alone(lm, HELLO, max_new_tokens=6, seed=5).token_ids
    context = lm.tokenizer.encode_chat(HELLO) + ids
    with torch.no_grad():
        logprobs = lm.logits(torch.tensor([context]))[0].log_softmax(-1)
    n = len(context) - len(ids)
    assert len(content) == len(ids)
    for i, (token, entry) in enumerate(zip(ids, content)):
        row = logprobs[n - 1 + i]
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        top = row.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [lm.tokenizer.decode([t], skip_special_tokens=False)
                                                         for t in top.indices.tolist()]


def test_stop_top_p_and_max_completion_tokens(client, lm):
    """The OpenAI names the other tests leave out: stop cuts the reply where the engine's does."""
    settings = {"max_new_tokens": 30, "seed": 13, "top_p": 0.8}
    full = alone(lm, HELLO, **settings).text
    stop = full[4:7]
    assert len(full) > 10 and full.index(stop) >= 1 and stop.strip()
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=30, seed=13,
                                           top_p=0.8, stop=[stop])
    expected = alone(lm, HELLO, **settings, stop=[stop])
    assert reply.choices[0].message.content == expected.text == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    # top_p counts: at 1 the same seed draws another reply
    assert full != alone(lm, HELLO, **{**settings, "top_p": 1.0}).text
    short = client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=5, seed=13,
                                           extra_body={"min_new_tokens": 5})
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"


def test_completions_logprobs_are_the_models(client, lm):
    import torch
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, seed=8, logprobs=2)
    prompt = lm.tokenizer.encode("Once upon a time")
    ids = generate(lm, prompt, Settings(**PLAIN, max_new_tokens=6, seed=8))[0].token_ids
    with torch.no_grad():
        logprobs = lm.logits(torch.tensor([prompt + ids]))[0].log_softmax(-1)
    got = reply.choices[0].logprobs
    pieces = [lm.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert got.tokens == pieces and len(got.token_logprobs) == len(ids)
    for i, token in enumerate(ids):
        row = logprobs[len(prompt) - 1 + i]
        assert got.token_logprobs[i] == pytest.approx(row[token].item(), abs=1e-4)
        top = row.topk(2)
        # one key per text: of two tokens that read the same (byte pieces show as U+FFFD), the likelier
        best = {}
        for t, value in zip(top.indices.tolist(), top.values.tolist()):
            best.setdefault(lm.tokenizer.decode([t], skip_special_tokens=False), value)
        assert list(got.top_logprobs[i]) == list(best)
        assert list(got.top_logprobs[i].values()) == pytest.approx(list(best.values()), abs=1e-4)
    # offsets into the reply's text: a byte piece's text waits for the rest of its character
    texts = [e.text for e in Generation(lm, prompt, [Settings(**PLAIN, max_new_tokens=6, seed=8)])
             if isinstance(e, Token)]
    assert got.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(ids))]
    assert reply.choices[0].text == "".join(texts)


def test_bad_settings_are_400_naming_them(client):
    for extra, param in [(dict(top_k=-1), "top_k"), (dict(temperature="hot"), "temperature"),
                         (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=10**6), "max_tokens"),
                         (dict(num_beams=3), "num_beams"), (dict(n=0), "n"), (dict(top_logprobs=3), "top_logprobs"),
                         (dict(tempreature=1), "tempreature")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=HELLO, extra_body=extra)
        error = e.value.body
        assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="../../etc", messages=HELLO)
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.body["message"]


def test_body_over_the_limit_is_413(server):
    status, raw = post(server.url + "/chat/completions", b"x" * (ServeConfig().max_body_bytes + 1))
    assert status == 413 and "--max-body-bytes" in json.loads(raw)["error"]["message"]


def test_api_key(lm, home):
    srv = Server({"tiny": lm}, ServeConfig(port=0, api_key="sesame", log=False)).start()
    try:
        for key in ("unused", "sesame2"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=srv.url, api_key=key, max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url, api_key="sesame", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices
        assert post(srv.url + "/models", None)[0] == 401
    finally:
        srv.stop()
    with pytest.raises(ParleyError, match="--api-key"):
        ServeConfig(host="0.0.0.0").check()


def test_serve_elsewhere_than_localhost_needs_a_key(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    assert "--api-key" in capsys.readouterr().err


def test_a_client_gone_mid_stream_frees_its_rows_and_is_logged_cancelled(client, server, home):
    batcher = server.engine.batchers["tiny"]
    # min_new_tokens keeps EOS away: only the disconnect can end this reply before 1,500 tokens
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go on"}],
                                            max_tokens=1500, stream=True, user="leaver",
                                            extra_body=dict(min_new_tokens=1500))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_for(lambda: not batcher.rows, "the rows to leave the batch")
    reply = wait_for_logged(home, "leaver")[-1]
    assert reply["finish_reason"] == "cancelled" and reply["completion_tokens"] < 1500


def test_a_client_gone_before_a_whole_reply_frees_its_rows(client, server, home, monkeypatch):
    """Not streamed: the client gives up (its timeout) while the reply decodes; the server sees the
    connection close and cancels the job rather than decoding the rest for nobody."""
    batcher = server.engine.batchers["tiny"]
    step = batcher.step

    def slow_step():   # 10 ms a step: the ~240 tokens the context leaves take seconds, past the timeout
        time.sleep(0.01)
        step()
    monkeypatch.setattr(batcher, "step", slow_step)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "go on"}], max_tokens=1500, user="quitter",
            extra_body={"min_new_tokens": 1500})
    wait_for(lambda: not batcher.rows, "the rows to leave the batch")
    reply = wait_for_logged(home, "quitter")[-1]
    assert reply["finish_reason"] == "cancelled" and 0 < reply["completion_tokens"] < 100


def wait_for_logged(home, user: str) -> list[dict]:
    """The replies (assistant messages) of the conversation the server logged for `user`."""
    found = []

    def logged():
        with Store() as store:
            convo = next((c for c in store.conversations() if f" {user}]" in c["title"]), None)
            if convo is not None and convo["current_leaf"]:
                parent = store.message(convo["current_leaf"])["parent_id"]
                found[:] = store.children(convo["id"], parent)
        return bool(found)
    wait_for(logged, f"the store to hold {user}'s conversation")
    return found


def test_requests_and_replies_are_kept_in_the_store(client, home):
    client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."}] + HELLO,
                                   max_tokens=5, seed=2, n=3, user="alice")
    replies = wait_for_logged(home, "alice")
    with Store() as store:
        convo = next(c for c in store.conversations() if " alice]" in c["title"])
        assert convo["title"].startswith("[/v1/chat/completions alice]") and convo["system_prompt"] == "Be brief."
        thread = store.thread(convo["id"])
        assert [m["role"] for m in thread] == ["user", "assistant"] and thread[0]["content"] == HELLO[0]["content"]
        assert sorted(r["settings"]["seed"] for r in replies) == [2, 3, 4]
        assert len(store.children(convo["id"], thread[0]["id"])) == 3
        # a comparison of the three, waiting to be ranked in the app
        comparison = next(iter(store.db.query("SELECT id FROM comparisons WHERE conversation_id = ?", [convo["id"]])))
        assert sorted(m["id"] for m in store.comparison(comparison["id"])["candidates"]) == sorted(r["id"] for r in replies)
    client.completions.create(model="tiny", prompt="Once upon", max_tokens=3, user="bob")
    wait_for_logged(home, "bob")


def test_no_log_writes_nothing(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path))
    srv = Server({"tiny": lm}, ServeConfig(port=0, log=False)).start()
    try:
        openai.OpenAI(base_url=srv.url, api_key="x").chat.completions.create(model="tiny", messages=HELLO,
                                                                              max_tokens=2, user="carol")
    finally:
        srv.stop()
    with Store() as store:
        assert store.conversations() == []


# -- continuous batching ------------------------------------------------------------------------

def run_joining(lm, prompts, settings, join_at: dict) -> tuple[int, dict]:
    """Request 0 through a Batcher, request join_at[k] submitted when a request reaches step k (it
    joins at the next step, mid-decode); returns the most rows decoded at once and each one's ids."""
    batcher = Batcher(lm)
    results, widest = {}, [0]

    def job(i):
        def emit(event):
            widest[0] = max(widest[0], len(batcher.rows))
            if i == 0 and isinstance(event, Token) and event.step in join_at:
                batcher.submit(job(join_at[event.step]))
            if isinstance(event, Finished):
                results[i] = event.token_ids
        return Job(prompts[i], [settings[i]], emit)

    batcher.submit(job(0))
    while batcher.busy:
        batcher.step()
    return widest[0], results

def test_requests_that_join_a_running_batch_get_what_they_get_alone(lm):
    """B joins while A decodes (B's prompt longer than A's so far: A's rows are left-padded), C joins
    later with a short prompt (C is padded); each gets exactly its tokens alone."""
    prompts = [lm.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in
               ["Hello there!", "What is your favourite book? I like reading stories about the sea. " * 3, "Hi"]]
    settings = [Settings(**PLAIN, seed=1, max_new_tokens=24),
                Settings(temperature=0.8, top_k=20, repetition_penalty=1.2, frequency_penalty=0.4, seed=2,
                         max_new_tokens=16, no_repeat_ngram_size=3),
                Settings(**{**PLAIN, "temperature": 0}, no_repeat_ngram_size=1, max_new_tokens=20)]
    expected = [generate(lm, p, s)[0].token_ids for p, s in zip(prompts, settings)]
    assert len(prompts[1]) > len(prompts[0]) + 4
    widest, results = run_joining(lm, prompts, settings, {3: 1, 7: 2})
    assert widest == 3   # all three decoded together
    assert [results[i] for i in range(3)] == expected


def test_a_row_gets_the_same_bits_beside_more_than_sixteen_others(lm):
    """Above 16 rows (engine/models/linear.py's MAX_ROWS) the products take other kernels: a row's
    tokens and log-probabilities must still be exactly what it gets alone."""
    prompt = lm.tokenizer.encode_chat(HELLO)
    settings = [Settings(**PLAIN, seed=100 + i, max_new_tokens=10, min_new_tokens=10) for i in range(20)]

    def run(job_settings):
        out = {}
        batcher = Batcher(lm)
        batcher.submit(Job(prompt, job_settings, lambda e: out.setdefault(e.candidate, []).append(
            (e.token_id, e.logprob)) if isinstance(e, Token) else None))
        while batcher.busy:
            batcher.step()
        return [out[c] for c in range(len(job_settings))]
    together = run(settings)
    assert together == [run([s])[0] for s in settings]
    assert len({tuple(t for t, _ in row) for row in together}) == 20


def test_concurrent_http_requests_each_get_their_own_reply(client, lm):
    seeds = [21, 22, 23, 24]
    replies = {}

    def ask(seed):
        replies[seed] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=20 + seed % 4, seed=seed, stream=True) if c.choices)
    threads = [threading.Thread(target=ask, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert replies == {s: alone(lm, HELLO, max_new_tokens=20 + s % 4, seed=s).text for s in seeds}


# -- Mirostat: mu is carried per row across steps, as a Generation carries it -----------------------
MIROSTAT = {"mirostat_tau": 2.0, "mirostat_eta": 0.5}   # low enough that mu cuts this model's distributions


def test_mirostat_rows_get_what_they_get_alone_while_others_join_and_leave(lm):
    """A (Mirostat) runs; C (no Mirostat, short) joins at A's step 1 and leaves first; B (Mirostat,
    other tau) joins at A's step 4. Each row's mu must follow it through the joins and the drop."""
    prompts = [lm.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in
               ["Tell me about the sea.", "What do you like to read on a rainy afternoon?", "Hi"]]
    settings = [Settings(**PLAIN, seed=11, max_new_tokens=24, **MIROSTAT),
                Settings(**PLAIN, seed=5, max_new_tokens=18, mirostat_tau=3.0, mirostat_eta=0.3),
                Settings(**PLAIN, seed=2, max_new_tokens=6)]
    expected = [generate(lm, p, s)[0].token_ids for p, s in zip(prompts, settings)]
    # mu does cut: without Mirostat the same seed draws other tokens
    assert expected[0] != generate(lm, prompts[0], replace(settings[0], mirostat_tau=0.0))[0].token_ids
    widest, results = run_joining(lm, prompts, settings, {1: 2, 4: 1})
    assert widest == 3
    assert [results[i] for i in range(3)] == expected


def test_a_served_mirostat_reply_is_parley_generates(client, lm):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=20, seed=9, n=2,
                                           extra_body=MIROSTAT)
    texts = [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]
    assert texts == [alone(lm, HELLO, max_new_tokens=20, seed=9 + i, **MIROSTAT).text for i in range(2)]
    assert texts[0] != alone(lm, HELLO, max_new_tokens=20, seed=9).text


def test_dry_in_a_served_request_uses_the_sequence_breakers(lm):
    """DRY's breakers come from the tokenizer's token texts: a served row must have them as a Generation
    does. Greedy on this model repeats "ik ik"; "k" as a breaker keeps DRY off that repeat."""
    prompt = lm.tokenizer.encode("a b a b a b a b a")
    dry = Settings(**{**PLAIN, "temperature": 0.0}, max_new_tokens=40, dry_multiplier=5.0, dry_allowed_length=1,
                   dry_sequence_breakers=["k"])
    expected = generate(lm, prompt, dry)[0].token_ids
    assert expected != generate(lm, prompt, replace(dry, dry_sequence_breakers=[]))[0].token_ids
    got = {}
    batcher = Batcher(lm)
    batcher.submit(Job(prompt, [dry], lambda e: got.setdefault("ids", e.token_ids) if isinstance(e, Finished) else 0))
    while batcher.busy:
        batcher.step()
    assert got["ids"] == expected
