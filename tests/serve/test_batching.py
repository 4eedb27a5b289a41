"""Continuous batching and speculative decoding in the server: requests decoded together
give what each gives alone (greedy and seeded sampling), speculative requests give plain
greedy output, and a job whose session is in use waits for it."""

import asyncio
import threading

import httpx
import pytest
import torch

from longctx.data import ByteTokenizer
from longctx.generation import stream
from longctx.model import LanguageModel
from longctx.model.config import ModelConfig
from longctx.serve.engine import Engine, Running
from longctx.serve.protocol import parse_request

from .test_server import client, post, text_of

openai = pytest.importorskip("openai")


def at_once(fn, args) -> list:
    """``fn(a)`` for every ``a`` in threads started together; the results in order."""
    results, errors = [None] * len(args), []
    barrier = threading.Barrier(len(args))

    def work(i, a):
        barrier.wait()
        try:
            results[i] = fn(a)
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def test_requests_decoded_together_equal_each_alone(server, loaded, reference):
    """Greedy: each answer is its prompt's greedy continuation; seeded sampling: each
    answer is what the same request gives alone.  The steps were batched."""
    _, tokenizer = loaded
    engine, c = server.engine, client(server)
    prompts = [f"{'xy' * i}batch {i}" for i in range(6)]  # different lengths: caches at different positions
    before = dict(engine.stats)
    greedy = at_once(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
                     .choices[0].text, prompts)
    assert greedy == [text_of(tokenizer, reference(tokenizer.encode(p), 12)) for p in prompts]
    steps = engine.stats["batched_steps"] - before["batched_steps"]
    assert steps and (engine.stats["batched_tokens"] - before["batched_tokens"]) / steps > 1

    def sampled(p):
        return c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=1.0, top_p=0.95,
                                    seed=len(p)).choices[0].text

    assert at_once(sampled, prompts) == [sampled(p) for p in prompts]


def test_speculative_requests_give_plain_greedy_output(server, loaded, reference):
    _, tokenizer = loaded
    c = client(server)
    prompt = "abcabcabc abcabc abc"  # copies for the lookup to find
    want = text_of(tokenizer, reference(tokenizer.encode(prompt), 20))
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0}
    assert post(server, "/completions", {**body, "draft": "lookup"}).json()["choices"][0]["text"] == want
    # beside batched requests, streamed
    texts = at_once(lambda d: "".join(p.choices[0].text for p in c.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True, extra_body={"draft": d})),
        ["lookup", "none", "lookup", "none"])
    assert texts == [want] * 4
    r = post(server, "/completions", {**body, "draft": "medusa"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "draft"


def test_speculative_decoding_needs_a_cache_that_forgets(sinks_server):
    r = httpx.post(sinks_server.url + "/completions", json={"model": "tiny", "prompt": "a", "draft": "lookup"},
                   headers={"Authorization": "Bearer secret"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "draft"
    assert "forget" in r.json()["error"]["message"]


def test_a_job_waits_while_a_running_job_writes_its_session(tmp_path):
    model = LanguageModel(ModelConfig(vocab_size=264, d_model=32, layers=["attention"], n_heads=2)).eval()
    engine = Engine(model, ByteTokenizer(), {"cache": "dense"}, sessions_dir=tmp_path)

    def job(session, fork=None):
        return engine.prepare(parse_request({"model": "m", "prompt": "a", "session": session, "fork": fork},
                                            chat=False))

    running = [Running(job("s"), None, None, 0)]
    same, forked, other = job("s"), job("u", fork="s"), job("t")
    for j in (same, forked, other):
        engine.submit(j)
    assert engine._take(running, block=False) is None  # "s" is being written: it waits
    assert engine._take(running, block=False) is None  # and so does a fork of it
    assert engine._take(running, block=False) is other
    assert engine.metrics()["queue_length"] == 2
    assert engine._take([], block=False) is same and engine._take([], block=False) is forked
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, ByteTokenizer(), {"cache": "dense"}, max_batch=0)
    with pytest.raises(ValueError, match="forget"):
        Engine(model, ByteTokenizer(), {"cache": "sinks"}, draft="lookup")


def run_engine(engine, bodies) -> list[str]:
    """Run ``bodies`` (completion requests) through ``engine``'s worker loop in this thread,
    all queued before it starts; the text of each."""
    loop = asyncio.new_event_loop()
    jobs = []
    for body in bodies:
        job = engine.prepare(parse_request({"model": "m", **body}, chat=False))
        job.attach(loop)
        engine.submit(job)
        jobs.append(job)
    engine._queue.put(None)  # the end: the loop returns once every job is done
    engine._work()
    loop.run_until_complete(asyncio.sleep(0))  # deliver the events the worker scheduled
    texts = []
    for job in jobs:
        events = [job.events.get_nowait() for _ in range(job.events.qsize())]
        assert events[0][0] == "start" and events[-1][0] == "end", events
        texts.append("".join(e[1] for e in events if e[0] == "text"))
    loop.close()
    return texts


@pytest.mark.parametrize("layers", [["mamba", "attention"], ["attention", "attention"]])
def test_the_worker_loop_batches_or_falls_back(layers):
    """A model with Mamba layers decodes its jobs one at a time (and says why), an attention
    model in batched steps; both give each job its greedy continuation."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=264, d_model=32, layers=layers, n_heads=2, init_std=0.5)).eval()
    tokenizer = ByteTokenizer()
    engine = Engine(model, tokenizer, {"cache": "dense"}, max_batch=3)
    assert (engine.unbatched is None) == ("mamba" not in layers)
    prompts = ["a", "bcd", "efghij", "k"]  # four jobs, three at a time: one joins as another leaves
    texts = run_engine(engine, [{"prompt": p, "max_tokens": 5 + i, "temperature": 0} for i, p in enumerate(prompts)])
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        ids = tokenizer.encode(prompt)
        if tokenizer.add_bos:
            ids = [tokenizer.bos_id, *ids]
        tokens = [int(t[0]) for t in stream(model, ids, 5 + i, temperature=0, stop=[tokenizer.eos_id])]
        assert text == text_of(tokenizer, tokens)
    mean_batch = engine.metrics()["mean_batch"]
    assert mean_batch is None if "mamba" in layers else mean_batch > 1
