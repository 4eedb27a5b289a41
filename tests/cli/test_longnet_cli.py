"""The longnet preset through the command line."""

import json

import pytest

from longctx.cli.main import main
from tests.cli.test_cli import TINY


def test_longnet_run_decodes_as_its_full_pass(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "longnet"
    args = [*TINY, "--set", "model.layers=['dilated','dilated']", "--set", "model.dilated_segments=[8,16,32]",
            "--set", "model.dilated_rates=[1,2,4]", "--set", "train.steps=3"]
    assert main(["train", "--preset", "longnet", "--data", str(tiny_corpus), "--out", str(run), "--quiet", *args]) == 0
    capsys.readouterr()
    data = ["--data", str(tiny_corpus / "mod0.py"), "--json"]
    # One full pass over 64 tokens (two of the longest segments) against the same 64
    # predictions decoded one token at a time through the dilated caches.
    assert main(["eval", str(run), *data, "--seq-len", "64", "--max-tokens", "64"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(["stream-eval", str(run), *data, "--cache", "dense", "--tokens", "65", "--quiet"]) == 0
    decoded = json.loads(capsys.readouterr().out)["dense"]
    assert full["tokens"] == decoded["tokens"] == 64
    assert decoded["nll"] == pytest.approx(full["loss"], rel=1e-5)
