"""Modules: norms, MLPs, mixers (registered by name) and the residual block."""

# Importing a mixer module registers its name.
from longctx.layers import attention as _attention  # noqa: F401
from longctx.layers import dilated as _dilated  # noqa: F401
from longctx.layers import mamba as _mamba  # noqa: F401
from longctx.layers import mamba2 as _mamba2  # noqa: F401
from longctx.layers.block import Block
from longctx.layers.mlp import SwiGLU
from longctx.layers.norm import RMSNorm
from longctx.layers.registry import get_mixer, mixer_names, register_mixer

__all__ = ["Block", "RMSNorm", "SwiGLU", "get_mixer", "mixer_names", "register_mixer"]
