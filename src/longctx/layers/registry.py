"""Mixer registry: a layer list names its mixers, the model looks them up here.

A mixer class is built as ``cls(config, layer_idx)`` and has ``forward(x, state=None)``
and ``init_state(batch_size, max_len=None)``.  New mixers register with ``@register_mixer("name")``
and become usable in any ``ModelConfig.layers`` without touching the model.
"""

from __future__ import annotations

from typing import Callable

_MIXERS: dict[str, type] = {}


def register_mixer(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise ValueError(f"mixer {name!r} is already registered by {_MIXERS[name].__qualname__}")
        _MIXERS[name] = cls
        return cls

    return wrap


def mixer_names() -> list[str]:
    return sorted(_MIXERS)


def get_mixer(name: str) -> type:
    try:
        return _MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; available: {', '.join(mixer_names())}") from None
