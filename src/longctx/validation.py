"""The validators every part of longctx checks its inputs with, so that each mistake gets
one wording: the name of the value, what it must be, and what was given.

Configs raise ``ConfigError`` (``check_fields`` checks every field of a config dataclass
against its annotation first, so a string where a number belongs is named as such);
ops and other functions raise ``ValueError``, of which ``ConfigError`` is a kind.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def check(condition: bool, message: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error(message)`` unless ``condition``."""
    if not condition:
        raise error(message)


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, allow_none: bool = False, error: type[Exception] = ValueError) -> Any:
    """``value`` if it is an integer >= 1 (or None when ``allow_none``); else ``error``."""
    if value is None and allow_none:
        return value
    check(is_int(value) and value >= 1, f"{name} must be a positive integer{' or None' if allow_none else ''}; "
          f"got {value!r}", error)
    return value


def non_negative_int(name: str, value: Any, *, error: type[Exception] = ValueError) -> Any:
    """``value`` if it is an integer >= 0; else ``error``."""
    check(is_int(value) and value >= 0, f"{name} must be an integer >= 0; got {value!r}", error)
    return value


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` has the type an annotation (``int``, ``float | None``, ``list[str]``, ...) names.
    An int is a float; a bool is neither."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return is_int(value)
    if origin in (list, tuple):
        (item, *_) = typing.get_args(annotation) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation these checks do not model


def _type_name(annotation: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "none"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in typing.get_args(annotation))
    if origin in (list, tuple):
        (item, *_) = typing.get_args(annotation) or (Any,)
        return "a list" + ("" if item is Any else f" of {_type_name(item).removeprefix('a ').removeprefix('an ')}s")
    if origin is dict or annotation is dict:
        return "a table"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_fields(config: Any, section: str, error: type[Exception] = ConfigError) -> None:
    """Check every field of the dataclass ``config`` against its type annotation; the error
    names ``section.field``, the expected type and the value given."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, annotation = getattr(config, f.name), hints[f.name]
        if not _matches(value, annotation):
            raise error(f"{section}.{f.name} must be {_type_name(annotation)}; got {value!r}")


def read_json_file(path: Path, *, missing: str, corrupt: str = "", error: type[Exception] = ConfigError) -> Any:
    """The JSON value in ``path``; ``error(missing)`` when there is no such file, and an error
    naming the file and the parse failure (plus ``corrupt``, what to do) when it is not JSON."""
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"'{path}' is not valid JSON ({e}){'; ' + corrupt if corrupt else ''}") from None
