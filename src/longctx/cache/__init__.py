"""Per-layer state objects (KV caches, recurrent states) behind one interface
(``LayerState``), the model-level state, and the attention cache policies."""

from longctx.cache.base import CACHE_POLICIES, DEFAULT_SINKS, DEFAULT_WINDOW, LayerState, check_policy
from longctx.cache.kv import KVCache
from longctx.cache.model_state import ModelState
from longctx.cache.sink import SinkKVCache
from longctx.cache.ssm import SSMState

__all__ = ["CACHE_POLICIES", "DEFAULT_SINKS", "DEFAULT_WINDOW", "KVCache", "LayerState", "ModelState", "SSMState",
           "SinkKVCache", "check_policy"]
