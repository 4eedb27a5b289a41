"""Per-layer state objects (KV caches, recurrent states) and the model-level state."""

from longctx.cache.kv import KVCache
from longctx.cache.model_state import ModelState
from longctx.cache.ssm import SSMState

__all__ = ["KVCache", "ModelState", "SSMState"]
