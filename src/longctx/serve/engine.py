"""The worker that owns the model: one thread runs every generation, in arrival order.

Torch modules and the decode kernels' scratch buffers are not safe to share between
threads, so the HTTP side never touches the model: it tokenizes and checks a request
(``Engine.prepare``), puts the ``Job`` on a bounded queue (``submit``; full: 429) and reads
the job's events from an asyncio queue the worker feeds: ``("start", cached_tokens)``,
``("text", piece)``... then ``("end", finish_reason, usage)``, or ``("error", APIError)``.

A job's life is split in three (``_admit``: its context and the tokens to feed;
``_advance``: one token; ``_finish``: save or cache the context) so that continuous
batching can later advance several admitted jobs in one batched step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from longctx.generation.generate import stream
from longctx.serve.context import Context, Mismatch, PrefixCache, resume
from longctx.serve.output import TextOutput
from longctx.serve.prompts import PLAIN_TEMPLATE, prompt_ids
from longctx.serve.protocol import APIError, Request, invalid
from longctx.serve.sessions import SessionStore

log = logging.getLogger("longctx.serve")

# max_tokens when a request gives none and the cache policy sets no position limit (sinks, recall)
UNBOUNDED_MAX_TOKENS = 2048


@dataclass
class Job:
    """One request on its way through the worker."""

    request: Request
    prompt: list[int]
    max_tokens: int
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events to ``loop`` (the server's, which awaits them)."""
        self.loop, self.events = loop, asyncio.Queue()

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class Running:
    """An admitted job: its context, the token stream and the text built so far."""

    job: Job
    ctx: Context
    tokens: Iterator
    output: TextOutput
    cached: int
    generated: int = 0
    finish: str = "length"


class Engine:
    """Generation for the HTTP server: the model, its tokenizer and cache policy
    (``cache_options``, ``init_state``'s), the sessions (``sessions_dir`` or None: refused),
    a prefix cache of ``prefix_entries`` finished contexts, and at most ``max_queue``
    waiting requests."""

    def __init__(self, model, tokenizer, cache_options: dict, *, sessions_dir=None, max_queue: int = 16,
                 prefix_entries: int = 4) -> None:
        self.model, self.tokenizer, self.cache_options = model, tokenizer, cache_options
        self.sessions = None if sessions_dir is None else SessionStore(sessions_dir, model, cache_options)
        self.prefix = PrefixCache(prefix_entries)
        self.template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
        limit = model.position_limit(model.init_state(1, **cache_options))
        # a model with a learned sink token spends one position on it
        self.limit = None if limit is None else limit - (model.sink is not None)
        self.stop_ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._running: Running | None = None
        self._stopping = False
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "prompt_tokens": 0,
                      "cached_prompt_tokens": 0, "tokens_generated": 0, "busy_seconds": 0.0, "ttft_sum": 0.0,
                      "ttft_count": 0}
        self._lock = threading.Lock()
        # HFTokenizer.encode_with_specials flips a flag of the shared tokenizer while it
        # encodes: handlers tokenizing at once (in the thread pool) must take turns
        self._tokenizing = threading.Lock()

    # --- the HTTP side ---------------------------------------------------------------

    def prepare(self, req: Request) -> Job:
        """Tokenize ``req`` and check it against the position limit (400s)."""
        if req.session is not None and self.sessions is None:
            raise invalid("session", "this server keeps no sessions: start it with --sessions-dir", "no_sessions")
        with self._tokenizing:
            prompt = prompt_ids(req, self.tokenizer, self.template, self.model.config.vocab_size)
        if self.limit is None:
            max_tokens = req.max_tokens or UNBOUNDED_MAX_TOKENS
        else:
            room = self.limit - len(prompt)
            if room < 1:
                raise invalid("messages" if req.chat else "prompt",
                              f"the prompt has {len(prompt)} tokens; this model and cache policy take at most "
                              f"{self.limit} positions, prompt and completion together", "context_length_exceeded")
            max_tokens = req.max_tokens or room
            if max_tokens > room:
                raise invalid("max_tokens", f"max_tokens {max_tokens} is too large: the prompt has {len(prompt)} "
                                            f"tokens and the limit is {self.limit} positions, so at most {room}",
                              "context_length_exceeded")
        return Job(req, prompt, max_tokens)

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"too many requests waiting ({self._queue.maxsize}); retry later",
                           code="queue_full", type="rate_limit_error") from None

    def metrics(self) -> dict:
        with self._lock:
            s = dict(self.stats)
        return {
            "requests": s["requests"], "completed": s["completed"], "cancelled": s["cancelled"],
            "failed": s["failed"], "queue_length": self._queue.qsize(), "active": int(self._running is not None),
            "prompt_tokens": s["prompt_tokens"], "cached_prompt_tokens": s["cached_prompt_tokens"],
            "tokens_generated": s["tokens_generated"],
            # over the time the worker spent on requests (prefill included)
            "tokens_per_second": s["tokens_generated"] / s["busy_seconds"] if s["busy_seconds"] else 0.0,
            "mean_time_to_first_token_s": s["ttft_sum"] / s["ttft_count"] if s["ttft_count"] else None,
            "prefix_cache_entries": len(self.prefix),
        }

    # --- the worker ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="longctx-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new requests, answer the waiting ones 503, stop the running one after its
        current token (its session is saved) and wait for the worker.  Called once uvicorn
        has let the requests in flight finish, or cancelled them."""
        self._stopping = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", APIError(503, "the server is shutting down", code="shutting_down"))
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():  # its client left while it waited
                job.emit("error", APIError(499, "the client closed the request", code="cancelled"))
                self._count(cancelled=1)
                continue
            start = time.perf_counter()
            self._count(requests=1)
            try:
                self._running = self._admit(job)
                job.emit("start", self._running.cached)
                while self._advance(self._running):
                    pass
                self._finish(self._running)
            except APIError as e:
                job.emit("error", e)
                self._count(failed=1)
            except Exception as e:  # the server must go on; the client gets a 500
                log.exception("request failed")
                job.emit("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", code="internal_error"))
                self._count(failed=1)
            finally:
                self._running = None
                self._count(busy_seconds=time.perf_counter() - start)

    def _start(self, job: Job) -> tuple[Context, list[int]]:
        """Where the job starts and the ids it still has to feed: its saved session (or the
        one it forks), else the prefix cache's best entry (a new session too), else a fresh
        state."""
        req = job.request
        if req.session is not None:
            if req.fork is not None and self.sessions.exists(req.session):
                raise APIError(409, f"session {req.session!r} exists; fork into a new name", param="session",
                               code="session_exists")
            name = req.fork or req.session
            if self.sessions.exists(name):
                try:
                    ctx = self.sessions.load(name)
                except ValueError as e:  # another model's or another cache policy's state
                    raise invalid("session", f"session {name!r} cannot be used: {e}", "session_unusable") from None
                try:
                    return ctx, resume(ctx, job.prompt)
                except Mismatch as e:
                    raise invalid("session", str(e), "session_mismatch") from None
            if req.fork is not None:
                raise APIError(404, f"session {req.fork!r} to fork from does not exist", param="fork",
                               code="session_not_found")
        ctx = self.prefix.take(job.prompt)
        if ctx is not None:
            try:
                return ctx, resume(ctx, job.prompt)
            except Mismatch:  # a cache that dropped the keys it would rewind to (LongNet's segments)
                pass
        ctx = Context(self.model.init_state(1, **self.cache_options), [])
        return ctx, resume(ctx, job.prompt)

    def _admit(self, job: Job) -> Running:
        ctx, new = self._start(job)
        req = job.request
        tokens = stream(self.model, new, job.max_tokens, temperature=req.temperature, top_p=req.top_p,
                        top_k=req.top_k, seed=req.seed, stop=self.stop_ids, state=ctx.state)
        cached = len(job.prompt) - len(new) - ("pending" in ctx.state.extra)  # stream feeds the pending first
        self._count(prompt_tokens=len(job.prompt), cached_prompt_tokens=cached)
        return Running(job, ctx, tokens, TextOutput(self.tokenizer, req.stop), cached)

    def _advance(self, run: Running) -> bool:
        """Generate one token and emit its text; False when the job is done."""
        if run.job.cancelled.is_set() or self._stopping:
            run.finish = "cancelled"
            return False
        token = next(run.tokens, None)
        if token is None:  # max_tokens reached
            return False
        token = int(token[0])
        run.ctx.tokens.append(token)
        run.generated += 1
        if run.generated == 1:
            self._count(ttft_sum=time.perf_counter() - run.job.arrived, ttft_count=1)
        if token in self.stop_ids:
            run.finish = "stop"
            return False
        piece = run.output.push(token)
        if piece:
            run.job.emit("text", piece)
        if run.output.stopped:
            run.finish = "stop"
            return False
        return run.generated < run.job.max_tokens

    def _finish(self, run: Running) -> None:
        """Flush the text, keep the context (session file or prefix cache), then answer: a
        client that got its answer finds its session saved."""
        run.tokens.close()
        tail = run.output.flush()
        if tail:
            run.job.emit("text", tail)
        # Before the first token the state has not seen the new prompt yet: keep nothing.
        if run.generated:
            if run.job.request.session is not None:
                self.sessions.save(run.job.request.session, run.ctx)
            # a session reloads its file next time, so its state can serve other prompts
            self.prefix.put(run.ctx)
        prompt = len(run.job.prompt)
        usage = {"prompt_tokens": prompt, "completion_tokens": run.generated, "total_tokens": prompt + run.generated,
                 "prompt_tokens_details": {"cached_tokens": run.cached}}
        self._count(tokens_generated=run.generated, **({"cancelled": 1} if run.finish == "cancelled" else
                                                       {"completed": 1}))
        run.job.emit("end", run.finish, usage)

    def _count(self, **amounts) -> None:
        with self._lock:
            for key, value in amounts.items():
                self.stats[key] += value
