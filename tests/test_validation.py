"""Config values of the wrong type are errors that name the field, the type and the value."""

import pytest

from longctx.model import ConfigError, ModelConfig
from longctx.train.config import load_run_config
from longctx.train.tasks import TaskConfig


@pytest.mark.parametrize("override,message", [
    ("train.lr=fast", "train.lr must be a number; got 'fast'"),
    ("train.steps=1.5", "train.steps must be an integer; got 1.5"),
    ("train.seed=true", "train.seed must be an integer; got True"),
    ("model.layers=attention", "model.layers must be a list of strings; got 'attention'"),
    ("model.max_seq_len=long", "model.max_seq_len must be an integer or none; got 'long'"),
    ("model.attn_bias=1", "model.attn_bias must be true or false; got 1"),
    ("data.tokenizer=3", "data.tokenizer must be a string; got 3"),
    ("sample.top_p=[1]", "sample.top_p must be a number; got [1]"),
])
def test_run_config_type_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_run_config("tiny", overrides=[override])
    assert str(e.value) == message


def test_integers_are_numbers_but_booleans_are_not():
    assert load_run_config("tiny", overrides=["train.lr=1"]).train.lr == 1
    with pytest.raises(ConfigError, match="model.rope_theta must be a number; got True"):
        ModelConfig(rope_theta=True)


def test_task_config_type_errors_name_the_field():
    with pytest.raises(ConfigError, match="task.steps must be an integer or none; got 'many'"):
        TaskConfig(task="induction", arch="mamba", steps="many")
