"""The HTTP side: a FastAPI app with OpenAI's routes over an ``Engine``.

Handlers never run the model.  They validate and tokenize a request, queue it, and relay the
worker's events, as server-sent events (``stream: true``) or as one JSON answer.  A client
that disconnects cancels its job: a streamed response is cancelled by Starlette when the
client goes (the generator's ``finally`` flags the job), a waiting one polls for it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from longctx.serve.engine import Engine, Job
from longctx.serve.protocol import APIError, chunk_body, completion_body, invalid, parse_request

DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there
GRACEFUL_SECONDS = 30.0  # how long a shutdown waits for requests in flight


class APIKeyMiddleware:
    """``Authorization: Bearer KEY`` on every request, else 401 (plain ASGI, so that it
    wraps streamed responses without buffering them)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                 code="invalid_api_key", type="authentication_error")
                await JSONResponse(error.body(), error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` once its client has gone (polled: a handler that is not sending has no
    other way to learn it)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL)
    job.cancelled.set()


def _sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(job: Job, rid: str, created: int):
    """The server-sent events of a started job, ending with ``data: [DONE]``."""
    req = job.request
    try:
        if req.chat:
            yield _sse(chunk_body(req, rid, created))
        while True:
            event = await job.events.get()
            if event[0] == "text":
                yield _sse(chunk_body(req, rid, created, text=event[1]))
            elif event[0] == "end":
                yield _sse(chunk_body(req, rid, created, finish=event[1]))
                if req.include_usage:
                    yield _sse(chunk_body(req, rid, created, usage=event[2]))
                break
            else:  # an error after the response began: reported in the stream, as OpenAI does
                yield _sse(event[1].body())
                break
        yield _sse("[DONE]")
    finally:
        job.cancelled.set()  # a client that left mid-stream; a no-op once the job ended


def create_app(engine: Engine, model_id: str, api_key: str | None = None) -> FastAPI:
    """The server's app; its lifespan starts the engine's worker and stops it on shutdown
    (after uvicorn let the requests in flight finish)."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="longctx", lifespan=lifespan)
    if api_key:
        app.add_middleware(APIKeyMiddleware, key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown routes (404), wrong methods (405)
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # a bug: still an OpenAI-style body
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), 500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return engine.metrics()

    model_card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "longctx"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise _unknown_model(name, model_id)
        return model_card

    async def generate(request: Request, chat: bool):
        arrived = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(None, f"the request body is not valid JSON: {e}", "invalid_json") from None
        req = parse_request(body, chat)
        if req.model != model_id:
            raise _unknown_model(req.model, model_id)
        job = await run_in_threadpool(engine.prepare, req)  # tokenizing a long prompt takes a while
        job.arrived = arrived
        job.attach(asyncio.get_running_loop())
        engine.submit(job)
        streaming = False
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            # Wait for the worker to take the job: a session's errors (404, 409) come then,
            # and still get their status code.
            event = await job.events.get()
            if event[0] == "error":
                raise event[1]
            rid, now = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
            if req.stream:
                streaming = True  # from here the response's generator owns the job
                return StreamingResponse(_stream(job, rid, now), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            pieces = []
            while (event := await job.events.get())[0] == "text":
                pieces.append(event[1])
            if event[0] == "error":
                raise event[1]
            return completion_body(req, rid, now, "".join(pieces), event[1], event[2])
        finally:
            # StreamingResponse watches for disconnects itself (reading the same channel)
            watcher.cancel()
            if not streaming:  # a finished job ignores it; one whose handler was cancelled stops
                job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    return app


def _unknown_model(name: str, model_id: str) -> APIError:
    return APIError(404, f"model {name!r} does not exist; this server serves {model_id!r}", param="model",
                    code="model_not_found")


def run(engine: Engine, model_id: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        graceful_seconds: float = GRACEFUL_SECONDS) -> None:
    """Serve until SIGINT or SIGTERM: uvicorn stops accepting connections, lets requests in
    flight finish for up to ``graceful_seconds`` and cancels the rest (whose sessions are
    saved with what they generated), then the engine's worker stops."""
    import uvicorn

    uvicorn.run(create_app(engine, model_id, api_key), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=graceful_seconds)
