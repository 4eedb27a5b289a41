"""A bounded load test: 16 concurrent clients x 2 streamed chat requests each, through
``bench/serve.py``'s load generator, against the tiny model: no errors, every answer the
greedy continuation of its own conversation, in bounded time."""

import importlib.util
import time
from pathlib import Path

import pytest

from .test_server import chat_ids, text_of

pytest.importorskip("openai")
BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench_serve(monkeypatch_module):
    monkeypatch_module.syspath_prepend(str(BENCH))  # for its `from machine import ...`
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def test_16_clients_x_2_requests(server, loaded, reference, bench_serve):
    _, tokenizer = loaded
    start = time.monotonic()
    run = bench_serve.load(server.url, "tiny", clients=16, requests=2, max_tokens=10, timeout=60)
    assert time.monotonic() - start < 60
    results = run["results"]
    assert len(results) == 32 and not [r["error"] for r in results if "error" in r]
    for r in results:
        expected = reference(chat_ids(tokenizer, [{"role": "user", "content": r["prompt"]}]), 10)
        assert r["text"] == text_of(tokenizer, expected)
        assert r["tokens"] == len(expected) and 0 < r["ttft"] <= r["latency"]
    row = bench_serve.summary(16, run)
    assert row["errors"] == 0 and row["requests"] == 32 and row["tokens/s"] > 0
    assert row["p50 latency s"] <= row["p99 latency s"]
