"""Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` (unless no MLP)."""

from __future__ import annotations

import torch
from torch import nn

from longctx.layers.mlp import SwiGLU
from longctx.layers.norm import RMSNorm
from longctx.layers.registry import get_mixer


class Block(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = get_mixer(config.layers[layer_idx])(config, layer_idx)
        # mlp_hidden = 0: mixer-only blocks, as in Mamba.
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps) if config.mlp_hidden else None
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden) if config.mlp_hidden else None

    def init_state(self, batch_size: int, max_len: int | None = None, **cache_options):
        """The mixer's state; ``cache_options`` go to its ``init_state`` (attention's cache policy)."""
        return self.mixer.init_state(batch_size, max_len, **cache_options)

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), state)
        if self.mlp is None:
            return x
        return x + self.mlp(self.mlp_norm(x))
