"""Pauses, filler, backspace and memory tokens in task runs: each option changes what the
model sees in training and evaluation (and the loss mask) as intended, a few steps of each
train, and compare's NAME:key=value specs reach them."""

import pytest
import torch

from longctx.data.synthetic import ADDITION_EQUALS, ADDITION_VOCAB, IGNORE
from longctx.eval.tasks import evaluate_task
from longctx.model import LanguageModel
from longctx.model.config import ConfigError
from longctx.train.tasks import TaskConfig, apply_overrides, evaluate_run, parse_arch, train_task
from longctx.train.tasks.mechanisms import FILLER_TOKEN, eval_after_prompt
from longctx.train.tasks.trainer import train_batch

TINY = {"model": {"d_model": 16, "n_heads": 2}, "train_len": 32, "batch_size": 4, "eval_every": 2,
        "val_examples": 4, "log_every": 1, "save_every": 2, "warmup": 1, "steps": 2, "start_len": 0}
MQAR = {"task": "mqar", "options": {"vocab": 16, "pairs": 4}}  # vocab 16: <pause> 16, <mem> 17, <backspace> 18
MEMORY = {"memory_tokens": 2, "memory_segment": 8}


def cfg_of(**kw):
    model = {**TINY["model"], **kw.pop("model", {})}
    return TaskConfig.from_dict({**TINY, **MQAR, "arch": "attention", "model": model, **kw})


def without(inputs, token):
    """Each row of ``inputs`` with ``token`` removed."""
    return [row[row != token] for row in inputs]


def test_ids_follow_the_task_vocabulary_only_when_used():
    assert cfg_of().model_config().vocab_size == 16 and not cfg_of().model_config().special_tokens
    assert cfg_of(pauses=4).model_config().special_tokens == {"pause": 16}
    model = cfg_of(backspace_rate=0.1, model=MEMORY).model_config()
    assert model.vocab_size == 19 and model.special_tokens == {"mem": 17, "backspace": 18}
    assert (model.memory_tokens, model.memory_segment) == (2, 8)


def test_pauses_and_filler_after_the_prompt():
    plain_x, plain_y = train_batch(cfg_of(), 3)
    for cfg, token in ((cfg_of(pauses=4), 16), (cfg_of(filler=4), FILLER_TOKEN["mqar"])):
        x, y = train_batch(cfg, 3)
        assert x.shape == (plain_x.shape[0], plain_x.shape[1] + 4)
        first = (plain_y != IGNORE).long().argmax(1)  # the last prompt position
        for b in range(x.shape[0]):
            f = int(first[b])
            assert torch.equal(x[b, : f + 1], plain_x[b, : f + 1]) and (x[b, f + 1 : f + 5] == token).all()
            assert torch.equal(x[b, f + 5 :], plain_x[b, f + 1 :])
            # The last inserted token answers; the prompt's end and the other insertions are out of the loss.
            assert (y[b, f : f + 4] == IGNORE).all() and y[b, f + 4] == plain_y[b, f]
            assert torch.equal(y[b, f + 5 :], plain_y[b, f + 1 :])


def test_pretrain_pauses_at_random_places_keep_the_answers():
    plain_x, plain_y = train_batch(cfg_of(), 5)
    x, y = train_batch(cfg_of(pretrain_pauses=3), 5)
    assert ((x == 16).sum(1) == 3).all()
    assert all(torch.equal(row, ref) for row, ref in zip(without(x, 16), plain_x))
    assert torch.equal(y[y != IGNORE], plain_y[plain_y != IGNORE])  # the same answers, in order
    assert (y[x == 16] != 16).all()  # never asked to output a pause


def test_backspace_rate_injects_mistakes_that_are_deleted():
    plain_x, _ = train_batch(cfg_of(), 7)
    x, y = train_batch(cfg_of(backspace_rate=0.5), 7)
    bs = x == 18
    assert bs.any()
    rows, cols = bs.nonzero(as_tuple=True)
    assert (y[rows, cols - 1] == 18).all()  # the mistake's target is the backspace
    assert (x[rows, cols - 1] != 18).all()
    assert not (train_batch(cfg_of(backspace_rate=0.0), 7)[0] == 18).any()


@pytest.mark.parametrize("kw, expected", [
    ({"pauses": 4}, (16, 4)),
    ({"pauses": 4, "eval_pauses": 0}, None),
    ({"eval_pauses": 8}, (16, 8)),  # inference-only pauses: the paper's control
    ({"filler": 4}, (FILLER_TOKEN["mqar"], 4)),
    ({"pretrain_pauses": 2}, None),
    ({}, None),
])
def test_evaluation_inserts_what_decoding_would(kw, expected):
    cfg = cfg_of(**kw)
    assert eval_after_prompt(cfg) == expected
    if expected is None:
        return
    model = LanguageModel(cfg.model_config())
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    evaluate_task(model, cfg, [32], examples=2, batch=2, after_prompt=expected)
    x = torch.cat(seen, 1)  # the chunks of one batch
    token, count = expected
    assert x.shape == (2, 32 + count) and ((x == token).sum(1) >= count).all()


def test_bad_mechanism_settings():
    for kw, match in (({"filler": 4, "pauses": 2}, "control for pauses"), ({"pauses": -1}, "task.pauses"),
                      ({"backspace_rate": 1.5}, "backspace_rate"), ({"backspace_errors": "nearby"}, "uniform"),
                      ({"model": {"memory_tokens": 2}}, "memory_segment")):
        with pytest.raises(ConfigError, match=match):
            cfg_of(**kw)


def test_overrides_and_arch_specs_reach_the_options():
    values = apply_overrides({**MQAR, "arch": "attention"}, ["task.pauses=8", "task.backspace_rate=0.1",
                                                              "model.memory_tokens=2", "model.memory_segment=8"])
    assert values["pauses"] == 8 and values["backspace_rate"] == 0.1 and values["model"] == MEMORY
    assert parse_arch("attention:pauses=8") == ("attention", {}, {"pauses": 8})
    assert parse_arch("attention:memory_tokens=2:memory_segment=8:memory_bptt=2") == (
        "attention", {**MEMORY, "memory_bptt": 2}, {})


@pytest.mark.parametrize("kw", [
    {"pauses": 2, "pretrain_pauses": 2}, {"filler": 2}, {"eval_pauses": 2}, {"backspace_rate": 0.2},
    {"model": MEMORY}, {"model": {**MEMORY, "memory_bptt": 1}, "pauses": 2},
], ids=["pauses", "filler", "eval_pauses", "backspace", "memory", "memory+pauses"])
def test_a_few_steps_of_each_train_and_evaluate(tmp_path, kw):
    cfg = cfg_of(**kw)
    result = train_task(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert result.step == 2 and result.val_accuracy is not None
    ev = evaluate_run(tmp_path / "run", [32, 64], examples=2, batch=2)
    assert set(ev["accuracy"]) == {32, 64} and all(isinstance(a, float) for a in ev["accuracy"].values())


def test_addition_pauses_follow_the_equals_sign(tmp_path):
    cfg = TaskConfig.from_dict({**TINY, "task": "addition", "arch": "attention", "train_len": 14, "pauses": 2})
    plain_x, plain_y = train_batch(TaskConfig.from_dict({**TINY, "task": "addition", "train_len": 14}), 0)
    x, y = train_batch(cfg, 0)
    assert cfg.model_config().special_tokens == {"pause": ADDITION_VOCAB}
    assert (x[:, 9] == ADDITION_EQUALS).all() and (x[:, 10:12] == ADDITION_VOCAB).all()
    assert (y[:, 9:11] == IGNORE).all() and torch.equal(y[:, 11:], plain_y[:, 9:])
    train_task(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert isinstance(evaluate_run(tmp_path / "run", examples=2, batch=2)["accuracy"][14], float)
