"""Per-layer state objects (KV caches, recurrent states) behind one interface
(``LayerState``), the model-level state, and the attention cache policies.

The names load on first use (PEP 562), so ``longctx.cache.policy`` can be read without torch.
"""

import importlib

_EXPORTS = {
    "CACHE_POLICIES": "policy", "DEFAULT_SINKS": "policy", "DEFAULT_WINDOW": "policy", "RECALL_DEFAULTS": "policy",
    "check_policy": "policy", "LayerState": "base", "KVCache": "kv", "ModelState": "model_state",
    "RecallCache": "recall", "SinkKVCache": "sink", "SSMState": "ssm", "MemoryState": "memory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
