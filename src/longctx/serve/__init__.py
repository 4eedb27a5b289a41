"""An OpenAI-compatible HTTP server (``longctx serve``): chat and text completions, streamed
or not, with prefix reuse and persistent, forkable sessions.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``.  Two fields extend OpenAI's requests:

- ``"session": NAME`` continues the session saved in ``--sessions-dir`` (a new name starts
  one) and saves it again, atomically, before the answer completes;
- ``"fork": OTHER`` (with ``session``) starts the new session ``NAME`` from ``OTHER``'s saved
  state (404 if ``OTHER`` does not exist, 409 if ``NAME`` does);
- ``"draft": "lookup"`` decodes speculatively with prompt-lookup drafts (dense caches; greedy
  output unchanged, sampling's distribution too), ``"none"`` plainly; without it, the
  server's ``--draft`` applies.

Requests that arrive together are decoded together (continuous batching, up to
``--max-batch``): see ``engine``.

A prompt is always the whole text: a chat's messages (rendered by the model's template) or a
completion's prompt.  Its longest common prefix with the session's tokens (or, without a
session, with a recent request's) is not fed again (``usage.prompt_tokens_details.
cached_tokens`` says how much); see ``context`` for what happens when the prompt does not
extend the history.

``engine`` owns the model (one worker thread, a bounded queue); ``app`` is the FastAPI side;
``protocol`` the OpenAI wire format; ``context`` and ``sessions`` the reuse of states;
``prompts`` and ``output`` the tokens in and the text out.  FastAPI and uvicorn are optional
dependencies: ``pip install 'longctx[serve]'``.
"""
