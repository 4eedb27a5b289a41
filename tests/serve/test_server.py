"""``longctx serve`` against live servers on localhost: the official openai client, greedy
output token for token as ``longctx.generation.stream``, each bad input's status code,
sessions, forks, prefix reuse, the queue limit, disconnects and the API key."""

import threading
import time

import httpx
import pytest

from longctx.generation.chat import render_chat

from .conftest import CHATML, MAX_LEN, sse_events

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


def text_of(tokenizer, tokens):
    """The text of generated ``tokens``, without the end-of-turn token that ended them."""
    if tokens and tokens[-1] == tokenizer.eos_id:
        tokens = tokens[:-1]
    decoder = tokenizer.stream_decoder()
    return "".join(decoder.push(t) for t in tokens) + decoder.flush()


def chat_ids(tokenizer, messages):
    return tokenizer.encode_with_specials(render_chat(CHATML, messages))


def client(live, key="none"):
    return openai.OpenAI(base_url=live.url, api_key=key, max_retries=0, timeout=30)


def post(live, path, body, key=None, **kwargs):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(live.url + path, json=body, headers=headers, timeout=30, **kwargs)


def test_completions_equal_greedy_stream(server, loaded, reference):
    _, tokenizer = loaded
    expected = reference(tokenizer.encode("def f(x):"), 20)
    c = client(server)
    answer = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=20, temperature=0)
    assert answer.choices[0].text == text_of(tokenizer, expected)
    assert answer.usage.prompt_tokens == len("def f(x):")
    assert answer.usage.completion_tokens == len(expected)
    assert answer.choices[0].finish_reason == ("stop" if expected[-1] == tokenizer.eos_id else "length")
    pieces = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=20, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == answer.choices[0].text


def test_chat_equals_greedy_stream(server, loaded, reference):
    _, tokenizer = loaded
    expected = reference(chat_ids(tokenizer, MESSAGES), 24)
    c = client(server)
    answer = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert answer.choices[0].message.content == text_of(tokenizer, expected)
    assert answer.usage.completion_tokens == len(expected)
    assert answer.usage.prompt_tokens == len(chat_ids(tokenizer, MESSAGES))
    chunks = list(c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == len(expected) and not chunks[-1].choices
    # the second request reused the first one's state (prefix cache), rewound to feed the
    # prompt's last token again: its logits give the first new token
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(chat_ids(tokenizer, MESSAGES)) - 1


def test_stop_strings_seed_and_models(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0).choices[0].text
    cut = next(i for i in range(1, len(full)) if full[i:i + 2].strip())  # some non-blank 2 characters inside
    stop = full[cut:cut + 2]
    stopped = c.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, stop=[stop])
    assert stopped.choices[0].text == full[: full.index(stop)] and stopped.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(p.choices[0].text for p in streamed) == stopped.choices[0].text
    sampled = [c.completions.create(model="tiny", prompt="abc", max_tokens=16, seed=7, temperature=1.0,
                                    top_p=0.9).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("path, body, status, param", [
    ("/completions", b"{not json", 400, None),
    ("/completions", [1, 2], 400, None),
    ("/completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("/completions", {"model": "tiny", "prompt": "a", "max_tokens": "9"}, 400, "max_tokens"),
    ("/completions", {"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/completions", {"model": "tiny", "prompt": "a", "stream": "yes"}, 400, "stream"),
    ("/completions", {"model": "tiny", "prompt": "a", "n": 2}, 400, "n"),
    ("/completions", {"model": "tiny", "prompt": "a", "seed": 2**64}, 400, "seed"),
    ("/completions", {"model": "tiny", "prompt": "a", "logprobs": 0}, 400, "logprobs"),
    ("/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ("/completions", {"model": "tiny", "prompt": "a" * MAX_LEN}, 400, "prompt"),
    ("/completions", {"model": "tiny", "prompt": "a", "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("/completions", {"model": "other", "prompt": "a"}, 404, "model"),
    ("/completions", {"model": "tiny", "prompt": "a", "session": "../x"}, 400, "session"),
    ("/completions", {"model": "tiny", "prompt": "a", "session": "new", "fork": "nowhere"}, 404, "fork"),
    ("/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/chat/completions", {"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/chat/completions", {"model": "tiny", "messages": MESSAGES, "logprobs": True}, 400, "logprobs"),
    ("/chat/completions", {"model": "tiny", "messages": MESSAGES, "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("/nowhere", {}, 404, None),
])
def test_bad_input_gets_its_status_and_an_openai_error(server, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    r = httpx.post(server.url + path, content=raw, json=None if raw else body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    # harmless fields are ignored; the server still answers
    ok = post(server, "/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "user": "u", "n": 1,
                                       "presence_penalty": 0, "metadata": {"k": "v"}})
    assert ok.status_code == 200


def test_session_continues_rewinds_and_forks(server, loaded, reference, tmp_path):
    _, tokenizer = loaded
    first = post(server, "/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 8, "temperature": 0,
                                          "session": "s"}).json()
    assert first["choices"][0]["text"] == text_of(tokenizer, reference(tokenizer.encode("Once"), 8))
    saved = server.engine.sessions.path("s")
    assert saved.is_file()
    # the whole text again, longer: the session keeps "Once", forgets its own continuation
    second = post(server, "/completions", {"model": "tiny", "prompt": "Once upon", "max_tokens": 8, "temperature": 0,
                                           "session": "s"}).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len("Once")
    assert second["choices"][0]["text"] == text_of(tokenizer, reference(tokenizer.encode("Once upon"), 8))
    before = saved.read_bytes()
    fork = post(server, "/completions", {"model": "tiny", "prompt": "Once upon a", "max_tokens": 4, "temperature": 0,
                                         "session": "t", "fork": "s"}).json()
    assert fork["usage"]["prompt_tokens_details"]["cached_tokens"] == len("Once upon")
    assert saved.read_bytes() == before  # forking leaves the source alone
    again = post(server, "/completions", {"model": "tiny", "prompt": "x", "session": "t", "fork": "s"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "session_exists"
    assert not list(saved.parent.glob(".*tmp"))


def test_chat_session_reuses_the_conversation(server, loaded, reference):
    _, tokenizer = loaded
    c = client(server)
    turn = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                     extra_body={"session": "chat"})
    messages = MESSAGES + [{"role": "assistant", "content": turn.choices[0].message.content},
                           {"role": "user", "content": "More."}]
    following = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"session": "chat"})
    assert following.usage.prompt_tokens_details.cached_tokens >= len(chat_ids(tokenizer, MESSAGES))
    assert following.choices[0].message.content == text_of(tokenizer, reference(chat_ids(tokenizer, messages), 10))


def test_sinks_session_extends_or_refuses(sinks_server, reference):
    tokenizer = sinks_server.engine.tokenizer  # no end-of-turn token
    prompt = tokenizer.encode("Hello there")
    generated = reference(prompt, 6, eos=False)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "session": "forever"}
    assert post(sinks_server, "/completions", body).status_code == 401  # the API key, on every route
    assert httpx.get(sinks_server.base + "/health").status_code == 401
    r = post(sinks_server, "/completions", body, key="secret").json()
    assert r["choices"][0]["text"] == text_of(tokenizer, generated)
    longer = prompt + generated + tokenizer.encode(" and")
    r = post(sinks_server, "/completions", {**body, "prompt": longer}, key="secret").json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt) + len(generated) - 1
    assert r["choices"][0]["text"] == text_of(tokenizer, reference(longer, 6, eos=False))
    # a sink cache cannot forget tokens: a prompt that does not extend the history is refused
    r = post(sinks_server, "/completions", {**body, "prompt": prompt + tokenizer.encode("!")}, key="secret")
    assert r.status_code == 400 and r.json()["error"]["code"] == "session_mismatch"


def test_full_queue_429_and_disconnect_cancels(sinks_server):
    """One request generates without end (no position limit), one waits, a third is refused;
    closing the first stream cancels it and the waiting one is served."""
    engine = sinks_server.engine
    before = engine.metrics()
    endless = {"model": "tiny", "prompt": "go", "max_tokens": 10**6, "stream": True}
    headers = {"Authorization": "Bearer secret"}
    with httpx.Client(timeout=30, headers=headers) as http:
        with http.stream("POST", sinks_server.url + "/completions", json=endless) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # it runs
            waiting = {}
            thread = threading.Thread(target=lambda: waiting.update(r=post(
                sinks_server, "/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3}, key="secret")))
            thread.start()
            while engine.metrics()["queue_length"] == 0:
                assert thread.is_alive()
                time.sleep(0.01)
            refused = post(sinks_server, "/completions", {"model": "tiny", "prompt": "x"}, key="secret")
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        thread.join(timeout=30)  # the stream is closed: its generation stops, the waiting request runs
    assert waiting["r"].status_code == 200
    after = engine.metrics()
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"] + 1
    assert after["queue_length"] == 0 and after["mean_time_to_first_token_s"] > 0 and after["tokens_per_second"] > 0


def test_stream_events_end_with_done(server):
    with httpx.stream("POST", server.url + "/chat/completions", timeout=30,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_concurrent_clients_get_their_own_answers(server, loaded, reference):
    """8 clients x 3 requests at once, streamed or not, on prompts that share prefixes: every
    answer is the greedy continuation of its own prompt."""
    _, tokenizer = loaded
    prompts = [f"{'ab' * (i % 3)}client {i}" for i in range(8)]
    expected = {p: text_of(tokenizer, reference(tokenizer.encode(p), 6)) for p in prompts}
    c = client(server)
    answers, errors = [], []

    def work(prompt):
        try:
            for k in range(3):
                if k % 2:
                    pieces = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                                  stream=True)
                    answers.append((prompt, "".join(p.choices[0].text for p in pieces)))
                else:
                    answer = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
                    answers.append((prompt, answer.choices[0].text))
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(answers) == 24
    assert all(text == expected[prompt] for prompt, text in answers)


def test_a_client_leaving_a_non_streamed_request_cancels_it(sinks_server):
    engine = sinks_server.engine
    cancelled = engine.metrics()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(sinks_server.url + "/completions", json={"model": "tiny", "prompt": "go", "max_tokens": 10**6},
                   headers={"Authorization": "Bearer secret"}, timeout=1.0)
    deadline = time.monotonic() + 10
    while engine.metrics()["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the generation went on without its client"
        time.sleep(0.05)
    assert engine.metrics()["active"] == 0
