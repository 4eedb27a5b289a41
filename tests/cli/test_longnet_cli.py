"""The longnet preset through the command line."""

from longctx.cli.main import main
from tests.cli.test_cli import TINY


def test_longnet_preset_trains_and_generates(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "longnet"
    args = [*TINY, "--set", "model.layers=['dilated','dilated']", "--set", "model.dilated_segments=[8,16,32]",
            "--set", "model.dilated_rates=[1,2,4]", "--set", "train.steps=3"]
    assert main(["train", "--preset", "longnet", "--data", str(tiny_corpus), "--out", str(run), "--quiet", *args]) == 0
    assert "unigram byte model" in capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "def f", "--max-new-tokens", "40", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f")
