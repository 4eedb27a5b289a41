"""Named sessions on disk: ``<dir>/<name>.safetensors`` holds a context's state (caches,
recurrent states, the pending token, the sampler's RNG) and its token ids.

Files are written by ``LanguageModel.save_state`` (``longctx.cache.io``): to a temporary
file renamed over the old one, so a killed server leaves either the previous or the new
session, never half of one.  The temporary files of a server killed while writing are
removed when the next one starts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longctx.serve.context import Context

TOKENS = "tokens"  # the key of the token ids in the state's extra tensors


class SessionStore:
    """Load and save the sessions of ``model`` under ``directory``; states are made with the
    server's ``cache_options`` (``init_state``'s)."""

    def __init__(self, directory: str | Path, model, cache_options: dict) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model, self.cache_options = model, cache_options
        for stale in self.directory.glob(".*.safetensors.tmp"):
            stale.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str) -> Context:
        """The saved session ``name``: FileNotFoundError if there is none, ValueError if the
        file belongs to another model or cache policy."""
        state = self.model.load_state(self.path(name), **self.cache_options)
        tokens = state.extra.pop(TOKENS, None)
        if tokens is None:
            raise ValueError(f"{self.path(name)} is a model state without the token ids of a server session")
        return Context(state, tokens.tolist())

    def save(self, name: str, ctx: Context) -> None:
        ctx.state.extra[TOKENS] = torch.tensor(ctx.tokens, dtype=torch.long)
        try:
            self.model.save_state(ctx.state, self.path(name))
        finally:
            del ctx.state.extra[TOKENS]
