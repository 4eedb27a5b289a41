"""The server's parts without HTTP: stop strings on streamed text, the reuse of a state by a
later prompt, and the plain chat format of models without a template."""

import pytest
import torch

from longctx.data import ByteTokenizer
from longctx.generation import stream
from longctx.model import LanguageModel
from longctx.model.config import ModelConfig
from longctx.serve.context import Context, Mismatch, PrefixCache, resume, reusable
from longctx.serve.engine import Engine
from longctx.serve.output import TextOutput
from longctx.serve.protocol import parse_request


def test_stop_strings_hold_back_what_may_start_one():
    out = TextOutput(ByteTokenizer(), ["END", "xy"])
    released = [out.push(b) for b in b"abcENxE"]
    assert "".join(released) == "abcENx"  # "E" may start "END", "x" may start "xy"... until "E" comes
    assert [out.push(b) for b in b"ND tail"][:2] == ["", ""] and out.stopped
    assert out.flush() == "" and out.text.startswith("abcENxEND")
    out = TextOutput(ByteTokenizer(), ["END"])
    assert "".join(out.push(b) for b in b"abEN") == "ab" and out.flush() == "EN"  # the end releases the rest


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=264, d_model=32, layers=["attention"] * 2, n_heads=2,
                                     init_std=0.5)).eval()


def _run(model, prompt, n, cache="dense", ctx=None):
    """Greedy ``n`` tokens after ``prompt``, from ``ctx`` (resumed) or a fresh state."""
    ctx = ctx or Context(model.init_state(1, cache=cache, sinks=2, window=64), [])
    new = resume(ctx, prompt)
    out = [int(t[0]) for t in stream(model, new, n, temperature=0, state=ctx.state)]
    ctx.tokens += out
    return ctx, out


def test_resume_extends_rewinds_or_refuses(model):
    ctx, first = _run(model, [1, 2, 3], 4)
    assert ctx.tokens == [1, 2, 3, *first] and ctx.fed == 6
    # a prompt extending history and pending token: nothing is fed again
    longer = [1, 2, 3, *first, 9]
    _, out = _run(model, longer, 3, ctx=ctx.fork())
    assert out == _run(model, longer, 3)[1]
    # a prompt that branches off is fed from the common prefix (dense: rewound)
    _, out = _run(model, [1, 2, 7], 3, ctx=ctx.fork())
    assert out == _run(model, [1, 2, 7], 3)[1]
    # a sink cache cannot forget: extending works, branching is refused
    sinks, first = _run(model, [1, 2, 3], 4, cache="sinks")
    _, out = _run(model, [1, 2, 3, *first, 9], 3, ctx=sinks.fork())
    assert out == _run(model, [1, 2, 3, *first, 9], 3)[1]
    with pytest.raises(Mismatch, match="cannot forget"):
        resume(sinks.fork(), [1, 2, 7])
    # nor can a memory-token model (its memory was written at segment ends), dense caches or not
    torch.manual_seed(0)
    memory = LanguageModel(ModelConfig(vocab_size=264, d_model=32, layers=["attention"] * 2, n_heads=2,
                                       memory_tokens=2, memory_segment=8, special_tokens={"mem": 260})).eval()
    ctx, _ = _run(memory, [1, 2, 3], 2)
    assert reusable(ctx, [1, 2, 7]) == 0  # so the prefix cache does not pick it
    with pytest.raises(Mismatch, match="cannot forget"):
        resume(ctx, [1, 2, 7])


def test_prefix_cache_picks_the_longest_reusable_entry(model):
    cache = PrefixCache(2)
    short, _ = _run(model, [1, 2], 2)
    long, _ = _run(model, [5, 6, 7, 8], 2)
    cache.put(short)
    cache.put(long)
    assert cache.take([5, 6, 7, 9]).tokens == long.tokens
    assert cache.take([3]) is None
    extended, _ = _run(model, long.tokens + [4], 1, ctx=cache.take(long.tokens + [4]))
    cache.put(extended)  # a dense entry it extends is dropped
    assert len(cache) == 2 and cache.take([5, 6]).tokens == extended.tokens


def test_models_without_a_chat_template_get_the_plain_format(model):
    engine = Engine(model, ByteTokenizer(), {"cache": "dense"})
    job = engine.prepare(parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, chat=True))
    assert bytes(job.prompt).decode() == "USER: hi\n\nASSISTANT: "
    job = engine.prepare(parse_request({"model": "m", "prompt": ""}, chat=False))
    assert job.prompt == [ByteTokenizer.bos_id]  # an empty prompt starts from bos, as `longctx generate`
