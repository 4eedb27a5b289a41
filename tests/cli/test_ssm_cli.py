"""State-space presets and sessions through the command line."""

import json

import pytest

from longctx.cli.main import main
from tests.cli.test_cli import TINY


@pytest.mark.parametrize("preset", ["mamba", "mamba2", "hybrid"])
def test_presets_train_a_few_steps(tmp_path, tiny_corpus, preset, capsys):
    run = tmp_path / preset
    args = [*TINY, "--set", "model.layers=" + json.dumps({"mamba": ["mamba"], "mamba2": ["mamba2"],
                                                          "hybrid": ["mamba", "attention"]}[preset]),
            "--set", "model.ssm_head_dim=16", "--set", "train.steps=3"]
    assert main(["train", "--preset", preset, "--data", str(tiny_corpus), "--out", str(run), "--quiet", *args]) == 0
    assert "unigram byte model" in capsys.readouterr().out


def test_generate_saves_and_resumes_a_session(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "run"
    args = [*TINY, "--set", "model.layers=['mamba','attention']", "--set", "model.mlp_hidden=0",
            "--set", "train.steps=2"]
    assert main(["train", "--data", str(tiny_corpus), "--out", str(run), "--quiet", *args]) == 0
    capsys.readouterr()
    gen = ["generate", str(run), "--temperature", "0"]
    assert main([*gen, "--prompt", "def f", "--max-new-tokens", "30"]) == 0
    whole = capsys.readouterr().out
    state = tmp_path / "session.safetensors"
    assert main([*gen, "--prompt", "def f", "--max-new-tokens", "12", "--save-state", str(state)]) == 0
    first = capsys.readouterr().out
    assert main([*gen, "--max-new-tokens", "18", "--load-state", str(state)]) == 0
    second = capsys.readouterr().out
    assert first.rstrip("\n") + second.rstrip("\n") == whole.rstrip("\n")


def test_import_hf_makes_a_run(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, state_size=8)
    transformers.MambaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["layers"] == ["mamba", "mamba"]
    assert main(["info", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["latest_checkpoint"] == "step_000000"
    assert main(["generate", str(tmp_path / "run")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert main(["import-hf", str(tmp_path / "bad"), str(tmp_path / "run2")]) == 2
    assert "not supported" in capsys.readouterr().err
