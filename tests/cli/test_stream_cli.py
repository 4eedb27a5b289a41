"""Streaming through the command line: sink caches in generate, chat sessions, and
Hugging Face checkpoint directories used directly (with the tokenizer beside them)."""

import io
import json
import math

import pytest

from longctx.cli.main import main
from tests.cli.test_cli import TINY
from tests.cli.test_ssm_cli import split_session


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("".join(f"def f{j}(x):\n    return x * {j}\n\n" for j in range(200)))
    out = root / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--quiet", *TINY, "--set", "train.steps=2"]) == 0
    return out


def test_stream_eval_compares_policies(run, tmp_path, capsys):
    corpus = run.parent / "corpus"
    args = ["stream-eval", str(run), "--data", str(corpus), "--sinks", "2", "--window", "14", "--tokens", "121",
            "--segment", "40", "--quiet"]
    assert main([*args, "--cache", "dense,window,sinks,recompute", "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert all(p in table for p in ("dense", "window", "sinks", "recompute"))
    assert {f.name for f in (tmp_path / "out").iterdir()} == {"stream.png", "stream.md", "stream.json"}
    report = json.loads((tmp_path / "out" / "stream.json").read_text())
    for r in report.values():
        assert r["tokens"] == 120 and [s["end"] - s["start"] for s in r["segments"]] == [40, 40, 40]
        assert math.isfinite(r["ppl"])
    # One cache size, 2 + 14 tokens: held from the first segment on by window and sinks;
    # recompute keeps no state; the dense cache grows.
    assert {p: r["span"] for p, r in report.items()} == {"dense": None, "window": 16, "sinks": 16, "recompute": 16}
    cache = {p: [s["cache_bytes"] for s in r["segments"]] for p, r in report.items()}
    assert len(set(cache["window"])) == len(set(cache["sinks"])) == 1 and cache["recompute"] == [0, 0, 0]
    assert cache["dense"][0] < cache["dense"][-1]
    assert main([*args, "--cache", "sinks", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sinks"]["nll"] == report["sinks"]["nll"]
    assert main([*args, "--cache", "sinks,lru"]) == 2
    assert "unknown stream policies ['lru']" in capsys.readouterr().err


def test_generate_with_sinks_streams_past_the_window(run, tmp_path, capsys):
    capsys.readouterr()
    gen = ["generate", str(run), "--temperature", "0", "--prompt", "def f"]
    assert main([*gen, "--max-new-tokens", "12"]) == 0
    dense = capsys.readouterr().out
    # While sinks + window hold every token, the sink cache is the dense cache.
    assert main([*gen, "--max-new-tokens", "12", "--cache", "sinks", "--sinks", "2", "--window", "30"]) == 0
    assert capsys.readouterr().out == dense
    # 120 tokens through a cache of 2 + 16 (each layer keeps 18 of the 119 fed), in one session or two.
    state = split_session(run, ["--cache", "sinks", "--sinks", "2", "--window", "16"], tmp_path, capsys, 60, 60)
    assert {tuple(state[f"layers.{i}.kept_k"].shape) for i in (0, 1)} == {(1, 18, 2, 16)}


def test_generate_cache_errors(run, capsys):
    assert main(["generate", str(run), "--cache", "sinks", "--sinks", "-1"]) == 2
    assert "sink" in capsys.readouterr().err


RECALL = ["--cache", "recall", "--sinks", "2", "--window", "16", "--block-size", "4", "--blocks", "2",
          "--repr-tokens", "2"]


def test_recall_in_generate_and_stream_eval(run, tmp_path, capsys):
    # 124 tokens through 2 sinks, a window of 16 and blocks of 4 on disk, in one session or two.
    state = split_session(run, [*RECALL, "--memory-dir", str(tmp_path / "mem")], tmp_path, capsys, 60, 60)
    assert int(state["layers.0.block_k"].shape[0]) == (int(state["seq_len"]) - 2 - 16) // 4
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["layer_0", "layer_1"]
    stream = ["stream-eval", str(run), "--data", str(run.parent / "corpus"), "--tokens", "81", "--segment", "40",
              "--quiet", "--json"]
    assert main([*stream, *RECALL[:1], "sinks,recall", *RECALL[2:]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recall"]["tokens"] == 80 and report["recall"]["span"] == 2 + 3 * 4 + 16
    assert report["sinks"]["span"] == 2 + 16


def test_recall_option_errors(run, capsys):
    gen = ["generate", str(run), "--prompt", "def f", "--max-new-tokens", "2"]
    assert main([*gen, "--cache", "sinks", "--block-size", "4", "--memory-dir", "m"]) == 2
    assert "--block-size, --memory-dir apply to --cache recall only" in capsys.readouterr().err
    assert main([*gen, *RECALL, "--window", "3"]) == 2
    assert "window (3) is smaller than a block (4)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*gen, *RECALL, "--blocks", "0"])
    assert "--blocks: must be a positive integer; got '0'" in capsys.readouterr().err


def test_chat_keeps_one_session_and_saves_it(run, tmp_path, capsys, monkeypatch):
    state = tmp_path / "chat.safetensors"
    chat = ["chat", str(run), "--temperature", "0", "--max-new-tokens", "10", "--template", "{prompt}\n",
            "--stop", "\n", "--cache", "sinks", "--sinks", "2", "--window", "40"]
    monkeypatch.setattr("sys.stdin", io.StringIO("def g\nreturn\n"))
    assert main(chat) == 0
    both = capsys.readouterr().out.split("\n")
    assert len(both) == 3 and both[2] == ""  # one line per reply
    # A session saved after the first turn and continued with the second chats the same.
    monkeypatch.setattr("sys.stdin", io.StringIO("def g\n"))
    assert main([*chat, "--save-state", str(state)]) == 0
    out = capsys.readouterr()
    assert out.out == both[0] + "\n" and "saved" in out.err
    monkeypatch.setattr("sys.stdin", io.StringIO("return\n"))
    assert main([*chat, "--load-state", str(state)]) == 0
    assert capsys.readouterr().out == both[1] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n"))
    assert main([*chat, "--template", "no prompt"]) == 2
    assert "{prompt}" in capsys.readouterr().err


def test_hf_checkpoint_directory_with_its_tokenizer(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    from tests.data.test_hf_tokenizer import byte_level_dir

    hf = byte_level_dir(tmp_path / "hf")
    vocab = json.loads((hf / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, state_size=8)
    transformers.MambaForCausalLM(cfg).save_pretrained(hf)
    gen = ["--temperature", "0", "--prompt", "def f", "--max-new-tokens", "8"]
    assert main(["generate", str(hf), *gen]) == 0
    direct = capsys.readouterr().out
    assert direct.startswith("def f") and len(direct) > len("def f\n")
    assert main(["import-hf", str(hf), str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), *gen]) == 0
    assert capsys.readouterr().out == direct
    assert main(["generate", str(hf), "--checkpoint", "step_1"]) == 2
    assert "Hugging Face checkpoint" in capsys.readouterr().err


def test_task_eval_of_text_tasks_on_a_model(run, tmp_path, capsys):
    """``task eval MODEL --task <text tasks>``: the retrieval table by length and policy, with
    the results, report and heatmaps in --out; a second call takes the measured cells."""
    out = tmp_path / "retrieval"
    args = ["task", "eval", str(run), "--task", "passkey_text,niah", "--lengths", "500,1k", "--cache",
            "dense,sinks:sinks=4:window=60,recall:sinks=4:window=64:block=16:topk=2", "--examples", "1",
            "--depths", "0.5", "--out", str(out)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"passkey_text", "niah"} and set(result["niah"]["dense"]) == {"500", "1024"}
    assert all(isinstance(a, float) for cells in result["niah"].values() for a in cells.values())
    assert (out / "heatmap_niah_sinks_sinks_4_window_60.png").is_file()
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "## passkey_text" in printed.out and "| 500 | 1K |" in printed.out
    lines = printed.err.splitlines()
    assert len(lines) == 12 and all(line.endswith("(from results.json)") for line in lines)
    assert main(["task", "eval", str(run), "--task", "niah,passkey", "--lengths", "1k"]) == 2
    assert "--task mixes text tasks" in capsys.readouterr().err
    assert main(["task", "eval", str(run), "--task", "niah"]) == 2
    assert "text tasks need --lengths" in capsys.readouterr().err
