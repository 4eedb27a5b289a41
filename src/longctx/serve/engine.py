"""The worker that owns the model: one thread runs every generation, several at a time.

Torch modules and the decode kernels' scratch buffers are not safe to share between
threads, so the HTTP side never touches the model: it tokenizes and checks a request
(``Engine.prepare``), puts the ``Job`` on a bounded queue (``submit``; full: 429) and reads
the job's events from an asyncio queue the worker feeds: ``("start", cached_tokens)``,
``("text", piece)``... then ``("end", finish_reason, usage)``, or ``("error", APIError)``.

Continuous batching: the worker keeps up to ``max_batch`` jobs running.  Each turn of its
loop admits one waiting job (``_admit``: its context, and the prefill of its prompt), then
advances every running job by one token (``_step``): the jobs whose last token is pending
are fed together in one ``batched_step`` (``longctx.generation.batched``: the matmuls on
the stacked tokens, attention per sequence against its own cache), each then samples its
next token with its own settings and generator; a job that finished leaves (``_finish``:
save or cache the context) and the next turn lets a new one in.  A job alone in the batch
takes the one-sequence kernel step (``fast_decode``) instead.  Jobs a batched step cannot
take, speculative ones (``draft``) and those of models with other than attention layers,
run their own ``stream``, one token per turn beside the batch.  Jobs naming a session that a
running job is writing wait until it is saved, as they would have one after the other.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from longctx.generation.batched import batched_step, unbatchable
from longctx.generation.fast_decode import fast_decoder
from longctx.generation.generate import Generation, stream
from longctx.generation.speculative import DRAFTS
from longctx.serve.context import Context, Mismatch, PrefixCache, can_rewind, resume
from longctx.serve.output import TextOutput
from longctx.serve.prompts import PLAIN_TEMPLATE, prompt_ids
from longctx.serve.protocol import APIError, Request, invalid
from longctx.serve.sessions import SessionStore

log = logging.getLogger("longctx.serve")

_END = object()  # _take's answer once the queue's end mark (None, from stop()) came

# max_tokens when a request gives none and the cache policy sets no position limit (sinks, recall)
UNBOUNDED_MAX_TOKENS = 2048


@dataclass
class Job:
    """One request on its way through the worker."""

    request: Request
    prompt: list[int]
    max_tokens: int
    draft: str | None = None  # speculative decoding's draft ("lookup"), or None
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events to ``loop`` (the server's, which awaits them)."""
        self.loop, self.events = loop, asyncio.Queue()

    @property
    def sessions(self) -> set[str]:
        """The sessions it reads or writes."""
        return {self.request.session, self.request.fork} - {None}

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class Running:
    """An admitted job: its context, where its tokens come from and the text built so far.
    The engine steps ``gen`` with the other batched jobs (``fast_step``: its one-sequence
    step, for when it is alone); a job the batched step cannot take has its own ``stream``,
    ``tokens``, instead."""

    job: Job
    ctx: Context
    output: TextOutput
    cached: int
    gen: Generation | None = None
    fast_step: Callable | None = None
    tokens: Iterator | None = None
    generated: int = 0
    finish: str = "length"


class Engine:
    """Generation for the HTTP server: the model, its tokenizer and cache policy
    (``cache_options``, ``init_state``'s), the sessions (``sessions_dir`` or None: refused),
    a prefix cache of ``prefix_entries`` finished contexts, at most ``max_queue`` waiting
    requests and ``max_batch`` running ones, and the speculative ``draft`` of requests that
    do not choose (None: none)."""

    def __init__(self, model, tokenizer, cache_options: dict, *, sessions_dir=None, max_queue: int = 16,
                 prefix_entries: int = 4, max_batch: int = 8, draft: str | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}")
        self.model, self.tokenizer, self.cache_options = model, tokenizer, cache_options
        self.sessions = None if sessions_dir is None else SessionStore(sessions_dir, model, cache_options)
        self.prefix = PrefixCache(prefix_entries)
        self.template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
        fresh = model.init_state(1, **cache_options)
        limit = model.position_limit(fresh)
        # a model with a learned sink token spends one position on it
        self.limit = None if limit is None else limit - (model.sink is not None)
        # speculative decoding rewinds the rejected drafts
        self.rewindable = can_rewind(fresh)
        if draft is not None and (problem := self._draft_problem(draft)):
            raise ValueError(problem)
        self.max_batch, self.draft = max_batch, draft
        self.unbatched = unbatchable(model, fresh)  # why jobs cannot share batched steps, or None
        if self.unbatched:
            log.info("jobs are decoded one at a time: %s", self.unbatched)
        self.stop_ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._waiting: deque[Job] = deque()  # taken from the queue; their session is in use
        self._thread: threading.Thread | None = None
        self._active = 0
        self._stopping = False
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "prompt_tokens": 0,
                      "cached_prompt_tokens": 0, "tokens_generated": 0, "busy_seconds": 0.0, "ttft_sum": 0.0,
                      "ttft_count": 0, "batched_steps": 0, "batched_tokens": 0}
        self._lock = threading.Lock()
        # HFTokenizer.encode_with_specials flips a flag of the shared tokenizer while it
        # encodes: handlers tokenizing at once (in the thread pool) must take turns
        self._tokenizing = threading.Lock()

    def _draft_problem(self, draft: str) -> str | None:
        """Why requests cannot decode speculatively with ``draft``; None when they can."""
        if draft not in DRAFTS:
            return f"draft must be one of {', '.join(DRAFTS)} or 'none'; got {draft!r}"
        if not self.rewindable:
            return ("speculative decoding needs states that can forget rejected drafts: an attention-only model "
                    "with --cache dense")
        return None

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
        draft = self.draft if req.draft is None else None if req.draft == "none" else req.draft
        if draft is not None and (problem := self._draft_problem(draft)):
            raise invalid("draft", problem, "unsupported_parameter")
        return Job(req, prompt, max_tokens, draft)

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise _shutting_down()
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
            "failed": s["failed"], "queue_length": self._queue.qsize() + len(self._waiting), "active": self._active,
            "prompt_tokens": s["prompt_tokens"], "cached_prompt_tokens": s["cached_prompt_tokens"],
            "tokens_generated": s["tokens_generated"],
            # over the time the worker spent on requests (prefill included)
            "tokens_per_second": s["tokens_generated"] / s["busy_seconds"] if s["busy_seconds"] else 0.0,
            "mean_time_to_first_token_s": s["ttft_sum"] / s["ttft_count"] if s["ttft_count"] else None,
            # sequences per batched step: how much the batching shared the weights' reads
            "mean_batch": s["batched_tokens"] / s["batched_steps"] if s["batched_steps"] else None,
            "prefix_cache_entries": len(self.prefix),
        }

    # --- the worker ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="longctx-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new requests, answer the waiting ones 503, stop the running ones after their
        current token (their sessions are saved) and wait for the worker.  Called once
        uvicorn has let the requests in flight finish, or cancelled them."""
        self._stopping = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", _shutting_down())
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def _work(self) -> None:
        running: list[Running] = []
        closing = False  # stop() put the queue's end mark
        with torch.no_grad():  # grad mode is per thread: the caller's inference mode does not reach here
            while running or not closing:
                job = self._take(running, block=not running) if len(running) < self.max_batch and not closing \
                    else None
                if job is _END:
                    closing, job = True, None
                    while self._waiting:
                        self._waiting.popleft().emit("error", _shutting_down())
                start = time.perf_counter()
                if job is not None and (run := self._begin(job)) is not None:
                    running.append(run)
                if running:
                    running = self._step(running)
                self._active = len(running)
                self._count(busy_seconds=time.perf_counter() - start)

    def _take(self, running: list[Running], block: bool):
        """The next job to admit: the first waiting one whose sessions are free, else the
        queue's next; None when there is none now, ``_END`` at the queue's end.  A job naming
        a session that a running job will write waits (up to ``max_batch`` of them; then
        the queue does)."""
        busy = {r.job.request.session for r in running} - {None}
        for job in self._waiting:
            if not job.sessions & busy:
                self._waiting.remove(job)
                return job
        if len(self._waiting) >= self.max_batch:
            return None
        try:
            job = self._queue.get(block=block)
        except queue.Empty:
            return None
        if job is None:
            return _END
        if job.sessions & busy:
            self._waiting.append(job)
            return None
        return job

    def _begin(self, job: Job) -> Running | None:
        """Admit ``job``: its context and, for a batched job, its prompt's prefill."""
        if self._stopping:
            job.emit("error", _shutting_down())
            return None
        if job.cancelled.is_set():  # its client left while it waited
            job.emit("error", APIError(499, "the client closed the request", code="cancelled"))
            self._count(cancelled=1)
            return None
        self._count(requests=1)
        try:
            run = self._admit(job)
        except Exception as e:
            self._fail(job, e)
            return None
        job.emit("start", run.cached)
        return run

    def _step(self, running: list[Running]) -> list[Running]:
        """Advance every running job by one token; returns those still running.  Cancelled
        jobs stop; batched jobs with a pending token are fed in one step; then each job takes
        its next token."""
        live = []
        for run in running:
            if run.job.cancelled.is_set() or self._stopping:
                run.finish = "cancelled"
                self._end(run)
            else:
                live.append(run)
        fed = [run for run in live if run.gen is not None and run.gen.emitted]
        if fed:
            try:
                self._feed(fed)
            except Exception as e:  # every job of the step fails; the server goes on
                for run in fed:
                    self._fail(run.job, e)
                live = [run for run in live if run not in fed]
        still = []
        for run in live:
            try:
                going = self._advance(run)
            except Exception as e:
                self._fail(run.job, e)
                continue
            if going:
                still.append(run)
            else:
                self._end(run)
        return still

    def _feed(self, fed: list[Running]) -> None:
        """Feed the batched jobs' pending tokens: one batched step, or the kernel step of a
        job alone."""
        tokens = torch.cat([run.gen.take_pending()[0] for run in fed])
        if len(fed) == 1 and fed[0].fast_step is not None:
            fed[0].gen.logits = fed[0].fast_step(tokens[None])
            return
        logits = batched_step(self.model, tokens, [run.gen.state for run in fed])
        for i, run in enumerate(fed):
            run.gen.logits = logits[i : i + 1]
        self._count(batched_steps=1, batched_tokens=len(fed))

    def _fail(self, job: Job, e: Exception) -> None:
        if not isinstance(e, APIError):  # a bug or a refusal from below: the client gets a 500
            log.error("request failed", exc_info=e)
            e = APIError(500, f"generation failed: {type(e).__name__}: {e}", code="internal_error")
        job.emit("error", e)
        self._count(failed=1)

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
        cached = len(job.prompt) - len(new) - ("pending" in ctx.state.extra)  # the pending token is fed first
        self._count(prompt_tokens=len(job.prompt), cached_prompt_tokens=cached)
        run = Running(job, ctx, TextOutput(self.tokenizer, req.stop), cached)
        sampling = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                        stop=self.stop_ids, state=ctx.state)
        if job.draft is not None or self.unbatched is not None:
            run.tokens = stream(self.model, new, job.max_tokens, draft=job.draft, **sampling)
        else:
            run.gen = Generation(self.model, new, job.max_tokens, **sampling)
            run.fast_step = fast_decoder(self.model, ctx.state)
        return run

    def _advance(self, run: Running) -> bool:
        """Take the job's next token and emit its text; False when the job is done."""
        if run.gen is not None:
            token = run.gen.next_token()
        else:
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

    def _end(self, run: Running) -> None:
        try:
            self._finish(run)
        except Exception as e:  # saving the session failed
            self._fail(run.job, e)

    def _finish(self, run: Running) -> None:
        """Flush the text, keep the context (session file or prefix cache), then answer: a
        client that got its answer finds its session saved."""
        if run.tokens is not None:
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


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="shutting_down")
