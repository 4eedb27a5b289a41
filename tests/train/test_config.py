import pytest

from longctx.model import ConfigError
from longctx.train.config import load_run_config, parse_override, preset_names
from longctx.train.optim import lr_at


def test_presets_load_and_overrides_apply(tmp_path):
    assert "tiny" in preset_names()
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nbatch_size = 3\n[model]\nn_heads = 2\n")
    cfg = load_run_config("tiny", toml, ["train.steps=7", "data.path=src/", "model.pos='alibi'"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.model.n_heads) == (7, 3, 2)
    assert cfg.data.path == "src/" and cfg.model.pos == "alibi"


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.stepz=3", r"unknown train config key\(s\): stepz; valid keys: .*steps"),
        ("optim.lr=3", r"unknown config section\(s\): optim"),
        ("train.lr=-1", "train.lr must be positive"),
        ("train.steps=0", "train.steps must be a positive integer"),
        ("model.pos='x'", "model.pos must be one of"),
        ("data.tokenizer='char'", "data.tokenizer must be"),
        ("trainsteps", "section.key=value"),
    ],
)
def test_bad_config_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("tiny", overrides=[override])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; available: .*tiny"):
        load_run_config("huge")


def test_override_values_parse_as_toml():
    assert parse_override("train.lr=3e-4") == {"train": {"lr": 3e-4}}
    assert parse_override("model.layers=['attention','attention']") == {"model": {"layers": ["attention"] * 2}}


def test_schedule_warms_up_then_decays_to_floor():
    cfg = load_run_config("tiny", overrides=["train.steps=100", "train.warmup_steps=10", "train.lr=1.0",
                                             "train.min_lr_ratio=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("override,match", [("sample.top_k=0", "sample.top_k"), ("sample.top_p=1.5", "sample.top_p")])
def test_sample_settings_are_checked_up_front(override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("tiny", overrides=[override])
