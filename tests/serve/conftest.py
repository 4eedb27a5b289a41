"""A tiny random model saved as a run (with a ChatML template), and live servers on it."""

import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
tk = pytest.importorskip("tokenizers")

import uvicorn  # noqa: E402

from longctx.data import HFTokenizer, save_tokenizer  # noqa: E402
from longctx.generation import stream  # noqa: E402
from longctx.model import LanguageModel  # noqa: E402
from longctx.model.config import ModelConfig  # noqa: E402
from longctx.serve.app import create_app  # noqa: E402
from longctx.serve.engine import Engine  # noqa: E402
from longctx.train.checkpoint import save_checkpoint, write_json_atomic  # noqa: E402
from longctx.train.config import RunConfig  # noqa: E402
from longctx.train.runs import load_run  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MAX_LEN = 256  # positions: the dense server refuses longer prompts


def make_run(path):
    """A run of a 2-layer random attention model and a byte-level tokenizer (no merges) with
    ChatML's control tokens, <|im_end|> as eos."""
    hf = tk.Tokenizer(tk.models.BPE(vocab={c: i for i, c in enumerate(sorted(tk.pre_tokenizers.ByteLevel.alphabet()))},
                                    merges=[]))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf.save(str(path / "tok.json"))
    tokenizer = HFTokenizer(tk.Tokenizer.from_file(str(path / "tok.json")), eos_token="<|im_end|>",
                            chat_template=CHATML)
    torch.manual_seed(0)
    # large initial weights: well separated logits, so that greedy choices do not hinge on rounding
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, layers=["attention"] * 2, n_heads=4,
                         max_seq_len=MAX_LEN, init_std=0.5)
    model = LanguageModel(config)
    run = path / "run"
    save_tokenizer(tokenizer, run)
    write_json_atomic(run / "config.json", RunConfig(model=config).to_dict())
    save_checkpoint(run, 0, model, None, {})
    return run


@pytest.fixture(scope="package")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="package")
def loaded(run_dir):
    """(model, tokenizer) as the server loads them."""
    _, model, tokenizer, _ = load_run(run_dir)
    return model, tokenizer


@pytest.fixture(scope="package")
def reference(run_dir):
    """``reference(ids, n)``: greedy tokens of ``longctx.generation.stream`` up to eos, on a
    model of its own (the servers' worker threads own theirs)."""
    _, model, tokenizer, _ = load_run(run_dir)

    def run(ids, n, eos=True):
        """``eos=False``: through the end-of-turn token, as a server whose tokenizer has none."""
        out = []
        for token in stream(model, ids, n, temperature=0, stop=[tokenizer.eos_id] if eos else []):
            out.append(int(token[0]))
            if eos and out[-1] == tokenizer.eos_id:
                break
        return out

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a background thread serving an ``Engine``; ``url`` is its /v1 base."""

    def __init__(self, engine: Engine, api_key=None) -> None:
        self.engine, self.port = engine, free_port()
        config = uvicorn.Config(create_app(engine, "tiny", api_key), host="127.0.0.1", port=self.port,
                                log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="package")
def server(loaded, tmp_path_factory):
    """Dense cache, sessions on."""
    model, tokenizer = loaded
    live = LiveServer(Engine(model, tokenizer, {"cache": "dense"}, sessions_dir=tmp_path_factory.mktemp("sessions")))
    yield live
    live.close()


@pytest.fixture(scope="package")
def sinks_server(run_dir, tmp_path_factory):
    """StreamingLLM cache (cannot forget tokens, no position limit), one running and one
    waiting request at most, an API key; no end-of-turn token, so generation ends at
    max_tokens only (the random model soon emits <|im_end|>) and a request can go on until
    cancelled."""
    _, model, tokenizer, _ = load_run(run_dir)
    tokenizer.eos_id = tokenizer.eos_token = None
    engine = Engine(model, tokenizer, {"cache": "sinks", "sinks": 4, "window": 200},
                    sessions_dir=tmp_path_factory.mktemp("sink_sessions"), max_queue=1, max_batch=1)
    live = LiveServer(engine, api_key="secret")
    yield live
    live.close()


def sse_events(lines) -> list:
    """The JSON payloads of a server-sent event stream's lines, up to ``[DONE]`` (which must come)."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: ")
        data = line[len("data: "):]
        if data == "[DONE]":
            return events
        events.append(json.loads(data))
    raise AssertionError("the stream ended without data: [DONE]")
