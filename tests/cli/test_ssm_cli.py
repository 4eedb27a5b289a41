"""State-space presets and sessions through the command line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from longctx.cli.main import main
from tests.cli.test_cli import TINY


def split_session(run, options, tmp_path, capsys, first, second):
    """Greedy generation of ``first + second`` tokens after "def f" in one session, and in
    two (saved after ``first``, loaded for ``second``): both print the same text and save
    the same state of every token fed (the last one waits, unfed), which is returned."""
    gen = ["generate", str(run), "--temperature", "0", *options]
    fresh = [*gen, "--seed", "0", "--prompt", "def f"]
    whole, part, end = (tmp_path / f"{name}.safetensors" for name in ("whole", "part", "end"))
    assert main([*fresh, "--max-new-tokens", str(first + second), "--save-state", str(whole)]) == 0
    text = capsys.readouterr().out
    assert main([*fresh, "--max-new-tokens", str(first), "--save-state", str(part)]) == 0
    begin = capsys.readouterr().out[:-1]  # without the newline generate ends with
    assert main([*gen, "--max-new-tokens", str(second), "--load-state", str(part), "--save-state", str(end)]) == 0
    assert begin + capsys.readouterr().out == text
    state, resumed = load_file(whole), load_file(end)
    assert state.keys() == resumed.keys() and all(torch.equal(state[k], resumed[k]) for k in state)
    assert int(state["seq_len"]) == len("def f") + first + second - 1
    return state


@pytest.mark.parametrize("preset", ["mamba", "mamba2", "hybrid"])
def test_presets_train_and_resume_a_session(tmp_path, tiny_corpus, preset, capsys):
    run = tmp_path / preset
    args = [*TINY, "--set", "model.layers=" + json.dumps({"mamba": ["mamba"], "mamba2": ["mamba2"],
                                                          "hybrid": ["mamba", "attention"]}[preset]),
            "--set", "model.ssm_head_dim=16", "--set", "train.steps=3"]
    assert main(["train", "--preset", preset, "--data", str(tiny_corpus), "--out", str(run), "--quiet", *args]) == 0
    capsys.readouterr()
    split_session(run, [], tmp_path, capsys, 12, 18)


def test_import_hf_makes_a_run(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, state_size=8)
    transformers.MambaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["layers"] == ["mamba", "mamba"]
    assert main(["info", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latest_checkpoint"] == "step_000000"
    assert main(["generate", str(tmp_path / "run")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert main(["import-hf", str(tmp_path / "bad"), str(tmp_path / "run2")]) == 2
    assert "not supported" in capsys.readouterr().err
