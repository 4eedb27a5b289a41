"""``longctx serve`` as a process: a session survives ``kill -9`` and a restart, and SIGTERM
lets the request in flight finish, saves its session and exits cleanly."""

import os
import signal
import subprocess
import sys
import time

import httpx

from longctx.serve.sessions import SessionStore
from longctx.train.runs import load_run

from .conftest import free_port, sse_events


class Process:
    def __init__(self, run_dir, sessions, log) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen([sys.executable, "-m", "longctx", "serve", str(run_dir), "--port", str(self.port),
                                      "--sessions-dir", str(sessions)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)

    def complete(self, **body):
        r = httpx.post(self.url + "/completions", json={"model": "run", "temperature": 0, **body}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()


def test_session_survives_kill_and_sigterm_saves(run_dir, reference, loaded, tmp_path):
    _, tokenizer = loaded
    sessions = tmp_path / "sessions"
    with open(tmp_path / "server.log", "wb") as log:
        first = Process(run_dir, sessions, log)
        try:
            first.complete(prompt="Once", max_tokens=8, session="keep")
        finally:
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(timeout=30)
        assert sorted(p.name for p in sessions.iterdir()) == ["keep.safetensors"]  # no half-written file

        second = Process(run_dir, sessions, log)
        try:
            again = second.complete(prompt="Once upon", max_tokens=8, session="keep")
            assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len("Once")
            expected = reference(tokenizer.encode("Once upon"), 8)
            assert again["choices"][0]["text"] == tokenizer.decode([t for t in expected if t != tokenizer.eos_id])
            # SIGTERM mid-stream: the request finishes, its session is saved, the server shuts down
            # cleanly (uvicorn then re-raises the signal: the exit status is SIGTERM's)
            body = {"model": "run", "prompt": "Twice", "max_tokens": 100, "temperature": 0, "session": "late",
                    "stream": True}
            with httpx.stream("POST", second.url + "/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                second.proc.send_signal(signal.SIGTERM)
                events = sse_events(lines)
            assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            assert second.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        finally:
            if second.proc.poll() is None:
                os.kill(second.proc.pid, signal.SIGKILL)
    model, _ = load_run(run_dir)[1:3]
    late = SessionStore(sessions, model, {"cache": "dense"}).load("late")
    generated = len(late.tokens) - len("Twice")
    assert 1 <= generated <= 100 and late.state.extra["pending"].item() == late.tokens[-1]
