"""Run configuration: model, data, training and sampling sections, from TOML presets.

Resolution order: the preset (``configs/NAME.toml`` in the package), then a user TOML
file, then ``--set section.key=value`` overrides.  Every section is a dataclass checked
on construction; unknown sections or keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from longctx.configs import preset_names
from longctx.distributed.layout import LAYOUTS
from longctx.model.config import ConfigError, ModelConfig
from longctx.validation import check, check_fields, positive_int


@dataclass
class DataConfig:
    path: str = ""  # file, folder or glob; "" is the built-in default corpus (Python stdlib)
    tokenizer: str = "byte"  # byte | bpe
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.01

    def __post_init__(self) -> None:
        check_fields(self, "data")
        check(self.tokenizer in ("byte", "bpe"), f"data.tokenizer must be 'byte' or 'bpe'; got {self.tokenizer!r}")
        check(self.bpe_vocab_size >= 300, f"data.bpe_vocab_size must be >= 300; got {self.bpe_vocab_size}")
        check(0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1); got {self.val_fraction}")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    sequence_parallel: int = 1  # processes each sequence is split over (run under torchrun)
    sequence_layout: str = "contiguous"  # contiguous | zigzag (balanced causal attention)
    dist_timeout: float = 300.0  # seconds a collective may wait for another process

    def __post_init__(self) -> None:
        check_fields(self, "train")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "save_every", "keep_checkpoints", "log_every", "sequence_parallel"):
            positive_int(f"train.{name}", getattr(self, name), error=ConfigError)
        check(0 <= self.warmup_steps, f"train.warmup_steps must be >= 0; got {self.warmup_steps}")
        check(self.lr > 0, f"train.lr must be positive; got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        check(self.weight_decay >= 0, f"train.weight_decay must be >= 0; got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables); got {self.grad_clip}")
        check(self.sequence_layout in LAYOUTS,
              f"train.sequence_layout must be one of {', '.join(LAYOUTS)}; got {self.sequence_layout!r}")
        check(self.dist_timeout > 0, f"train.dist_timeout must be positive; got {self.dist_timeout}")


@dataclass
class SampleConfig:
    """The sample printed at the end of training."""

    prompt: str = "def "
    max_new_tokens: int = 300
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "sample")
        check(self.max_new_tokens >= 0, f"sample.max_new_tokens must be >= 0; got {self.max_new_tokens}")
        check(self.temperature >= 0, f"sample.temperature must be >= 0 (0 is greedy); got {self.temperature}")
        check(self.top_k >= 1, f"sample.top_k must be >= 1; got {self.top_k}")
        check(0 < self.top_p <= 1, f"sample.top_p must be in (0, 1]; got {self.top_p}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(sections))
        check(not unknown, f"unknown config section(s): {', '.join(unknown)}; valid: {', '.join(sections)}")
        built = {}
        for name, section_cls in _SECTIONS.items():
            table = values.get(name, {})
            check(isinstance(table, dict), f"config section [{name}] must be a table; got {table!r}")
            if section_cls is ModelConfig:
                built[name] = ModelConfig.from_dict(table)
                continue
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = sorted(set(table) - known)
            check(not bad, f"unknown {name} config key(s): {', '.join(bad)}; valid keys: {', '.join(sorted(known))}")
            try:
                built[name] = section_cls(**table)
            except TypeError as e:
                raise ConfigError(f"invalid [{name}] config: {e}") from None
        return cls(**built)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "sample": SampleConfig}


def _read_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, table in update.items():
        if isinstance(table, dict) and isinstance(out.get(section), dict):
            out[section].update(table)
        else:
            out[section] = table
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 0.0003}}``; the value is read as TOML,
    falling back to a plain string (so ``data.path=src/`` needs no quotes)."""
    key, sep, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    check(bool(sep and dot and section and name), f"--set expects section.key=value (e.g. train.lr=3e-4); got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return {section: {name: parsed}}


def load_run_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] = (),
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a ``RunConfig`` from a preset, a TOML file and ``section.key=value`` overrides.

    ``base`` (e.g. the saved config of a run being resumed) replaces the preset.
    """
    values: dict[str, Any] = dict(base or {})
    if preset is not None:
        names = preset_names()
        check(preset in names, f"unknown preset {preset!r}; available: {', '.join(names)}")
        text = resources.files("longctx.configs").joinpath(f"{preset}.toml").read_text()
        values = _merge(values, _read_toml(text, f"preset {preset!r}"))
    if config_file is not None:
        path = Path(config_file)
        check(path.is_file(), f"config file '{path}' does not exist")
        values = _merge(values, _read_toml(path.read_text(), f"config file '{path}'"))
    for text in overrides:
        values = _merge(values, parse_override(text))
    return RunConfig.from_dict(values)
