"""Model configuration: one dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from longctx.data.tokenizer_base import MECHANISM_TOKENS
from longctx.ops.dilated import check_patterns
from longctx.ops.rope import check_rope_scaling
from longctx.validation import ConfigError, check_fields, non_negative_int, positive_int

POSITIONS = ("rope", "alibi", "learned", "none")


@dataclass
class ModelConfig:
    """Shape of a ``LanguageModel``.

    ``layers`` lists one mixer name per block (e.g. ``["attention"] * 8``); any name in
    the mixer registry works, so hybrids are configuration.
    """

    vocab_size: int = 264
    d_model: int = 256
    layers: list[str] = field(default_factory=lambda: ["attention"] * 4)
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    pos: str = "rope"  # rope | alibi | learned (absolute, needs max_seq_len) | none
    rope_theta: float = 10000.0
    # RoPE frequency scaling, None or {"rope_type": "linear" | "dynamic" | "llama3" | "yarn", "factor": ..., ...}
    # with the keys of Hugging Face's rope_parameters (longctx.ops.rope.ROPE_SCALINGS lists them per type).
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int | None = None  # absolute limit; required by pos="learned"
    # The context length the weights were trained for (Hugging Face's max_position_embeddings):
    # informational, never enforced (max_seq_len is the limit) but by recall caches, which keep
    # a query's span within it, and stream_compare stops dense there; to_hf writes it back.
    context_len: int | None = None
    mlp_hidden: int | None = None  # SwiGLU width; None: 8/3 d_model rounded up to 64; 0: no MLP
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # A learned sink token (StreamingLLM §3.3) prepended to every sequence: position 0 of
    # each fresh sequence, in training and generation; a sink cache with sinks = 1 keeps it.
    sink_token: bool = False
    init_std: float = 0.02
    # Attention layers: biases of the q/k/v projections (Qwen2) and of the output projection
    # (Llama's attention_bias sets both); a sliding window (Mistral): each query attends to
    # itself and the attn_window - 1 tokens before it (None: to every earlier token).
    attn_bias: bool = False
    attn_out_bias: bool = False
    attn_window: int | None = None
    # State-space mixers ("mamba", "mamba2"); defaults are the papers'.
    ssm_state: int = 16  # N, the state size per channel
    ssm_expand: int = 2  # d_inner = ssm_expand * d_model
    ssm_conv: int = 4  # width of the depthwise causal conv
    ssm_dt_rank: int | None = None  # mamba: None -> ceil(d_model / 16)
    ssm_dt_min: float = 0.001  # initial step sizes are log-uniform in [dt_min, dt_max]
    ssm_dt_max: float = 0.1
    ssm_dt_floor: float = 1e-4
    ssm_head_dim: int = 64  # mamba2: channels per head
    ssm_groups: int = 1  # mamba2: heads sharing one B and C
    ssm_chunk: int = 64  # mamba2: chunk length of the SSD algorithm
    ssm_bias: bool = False  # biases of the in/out projections
    ssm_conv_bias: bool = True
    # mamba: False makes the SSM time-invariant (S4D-like, the baseline of the Mamba paper's
    # selectivity ablations): step size, B and C are learned constants, not functions of the input.
    ssm_selective: bool = True
    # LongNet dilated attention ("dilated"): segment lengths w and dilation rates r, the
    # paper's set by default (longctx.ops.dilated.dilated_patterns builds geometric ones).
    dilated_segments: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768])
    dilated_rates: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 12])
    # The mechanism tokens the model was trained with, name -> id ({"pause": 259}; names in
    # longctx.data.tokenizer_base.MECHANISM_TOKENS): what pause and backspace decoding read,
    # and why to_hf refuses the model (no Hugging Face architecture applies them).
    special_tokens: dict[str, int] = field(default_factory=dict)
    # Memory tokens (Recurrent Memory Transformer, Bulatov et al. 2022; longctx.model.memory):
    # the input is processed in segments of memory_segment tokens, each reading memory_tokens
    # memory embeddings and writing as many for the next segment (at <mem> write slots, so
    # special_tokens needs "mem"); training backpropagates through memory_bptt segments
    # (None: through every segment of a training sequence).
    memory_tokens: int = 0
    memory_segment: int | None = None
    memory_bptt: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "model")
        self.layers = list(self.layers)
        self.dilated_segments, self.dilated_rates = list(self.dilated_segments), list(self.dilated_rates)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.d_model // self.n_heads
        if self.mlp_hidden is None:
            self.mlp_hidden = 64 * -(-(8 * self.d_model) // (3 * 64))
        if self.ssm_dt_rank is None:
            self.ssm_dt_rank = -(-self.d_model // 16)
        if isinstance(self.rope_scaling, dict):
            try:
                self.rope_scaling = check_rope_scaling(self.rope_scaling)
            except ValueError as e:
                raise ConfigError(f"model.rope_scaling: {e}") from None
        self.validate()

    def validate(self) -> None:
        def positive(name: str) -> None:
            positive_int(f"model.{name}", getattr(self, name), error=ConfigError)

        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "ssm_state", "ssm_expand",
                     "ssm_conv", "ssm_dt_rank", "ssm_head_dim", "ssm_groups", "ssm_chunk"):
            positive(name)
        non_negative_int("model.mlp_hidden", self.mlp_hidden, error=ConfigError)
        if not 0 < self.ssm_dt_min <= self.ssm_dt_max:
            raise ConfigError(
                f"need 0 < model.ssm_dt_min <= model.ssm_dt_max; got {self.ssm_dt_min}, {self.ssm_dt_max}"
            )
        if "mamba2" in self.layers:
            d_inner = self.ssm_expand * self.d_model
            if d_inner % self.ssm_head_dim:
                raise ConfigError(
                    f"mamba2 needs ssm_expand * d_model ({d_inner}) divisible by model.ssm_head_dim "
                    f"({self.ssm_head_dim})"
                )
            if (d_inner // self.ssm_head_dim) % self.ssm_groups:
                raise ConfigError(
                    f"mamba2 has {d_inner // self.ssm_head_dim} heads, not divisible by model.ssm_groups "
                    f"({self.ssm_groups})"
                )
        if "dilated" in self.layers:
            try:
                check_patterns(self.dilated_segments, self.dilated_rates)
            except ValueError as e:
                raise ConfigError(f"model.dilated_segments / model.dilated_rates: {e}") from None
            if self.max_seq_len is not None and self.max_seq_len > max(self.dilated_segments):
                raise ConfigError(
                    f"model.max_seq_len ({self.max_seq_len}) exceeds the longest dilated segment "
                    f"({max(self.dilated_segments)}): tokens further apart would never interact; add longer "
                    "patterns (e.g. longctx.ops.dilated.dilated_patterns(max_seq_len)) or lower max_seq_len"
                )
        if not self.layers or not all(isinstance(x, str) for x in self.layers):
            raise ConfigError(f"model.layers must be a non-empty list of mixer names; got {self.layers!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.d_model % self.n_heads and self.head_dim == self.d_model // self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) is not divisible by model.n_heads ({self.n_heads}); "
                "change one of them or set model.head_dim"
            )
        if self.pos not in POSITIONS:
            raise ConfigError(f"model.pos must be one of {', '.join(POSITIONS)}; got {self.pos!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.pos = 'rope' needs an even head_dim; got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta must be positive; got {self.rope_theta}")
        if self.pos == "learned" and self.max_seq_len is None:
            raise ConfigError("model.pos = 'learned' needs model.max_seq_len (the number of positions)")
        if self.max_seq_len is not None:
            positive("max_seq_len")
        if not self.norm_eps > 0:
            raise ConfigError(f"model.norm_eps must be positive; got {self.norm_eps}")
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std must be positive; got {self.init_std}")
        if self.pos != "rope" and self.rope_theta != 10000.0:
            warnings.warn(f"model.rope_theta is ignored with model.pos = {self.pos!r}", stacklevel=3)
        try:
            check_rope_scaling(self.rope_scaling)
        except ValueError as e:
            raise ConfigError(f"model.rope_scaling: {e}") from None
        if self.rope_scaling is not None:
            if self.pos != "rope":
                warnings.warn(f"model.rope_scaling is ignored with model.pos = {self.pos!r}", stacklevel=3)
            elif self.rope_scaling["rope_type"] == "dynamic" and self.head_dim <= 2:
                raise ConfigError(f"model.rope_scaling 'dynamic' needs head_dim > 2; got {self.head_dim}")
        if self.context_len is not None:
            positive("context_len")
        self._check_special_tokens()
        self._check_memory()
        if self.attn_window is not None:
            positive("attn_window")
            if "dilated" in self.layers:
                raise ConfigError("model.attn_window applies to 'attention' layers; 'dilated' layers have their own "
                                  "sparse pattern (model.dilated_segments / dilated_rates): remove one of them")
            if "attention" not in self.layers:
                warnings.warn("model.attn_window is ignored: model.layers has no 'attention' layer", stacklevel=3)

    def _check_special_tokens(self) -> None:
        tokens = self.special_tokens
        if not isinstance(tokens, dict) or set(tokens) - set(MECHANISM_TOKENS):
            raise ConfigError(f"model.special_tokens must map names among {', '.join(MECHANISM_TOKENS)} to token "
                              f"ids; got {tokens!r}")
        for name, token_id in tokens.items():
            if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < self.vocab_size:
                raise ConfigError(f"model.special_tokens.{name} must be a token id in 0..{self.vocab_size - 1}; "
                                  f"got {token_id!r}")
        if len(set(tokens.values())) != len(tokens):
            raise ConfigError(f"model.special_tokens gives two mechanisms the same id: {tokens}")

    def _check_memory(self) -> None:
        non_negative_int("model.memory_tokens", self.memory_tokens, error=ConfigError)
        if not self.memory_tokens:
            ignored = [name for name in ("memory_segment", "memory_bptt") if getattr(self, name) is not None]
            if ignored:
                warnings.warn(f"model.{' and model.'.join(ignored)} ignored: model.memory_tokens is 0", stacklevel=4)
            return
        if self.memory_segment is None:
            raise ConfigError("model.memory_tokens needs model.memory_segment: the tokens per segment, each of "
                              "which reads and writes the memory")
        positive_int("model.memory_segment", self.memory_segment, error=ConfigError)
        positive_int("model.memory_bptt", self.memory_bptt, allow_none=True, error=ConfigError)
        if "mem" not in self.special_tokens:
            raise ConfigError("model.memory_tokens needs the <mem> token, whose embedding marks the write slots: "
                              "set model.special_tokens.mem to its id (the tokenizer's mem_id)")
        if self.sink_token:
            raise ConfigError("model.sink_token and model.memory_tokens both put learned vectors at the start of "
                              "the sequence, and the memory restarts every segment: use one of them")
        span = self.memory_segment + 2 * self.memory_tokens  # read memory, tokens, write slots
        if self.max_seq_len is not None and span > self.max_seq_len:
            raise ConfigError(f"a segment spans {span} positions (model.memory_segment + 2 * model.memory_tokens), "
                              f"more than model.max_seq_len ({self.max_seq_len}): shorten the segment or raise "
                              "max_seq_len")

    def special_token(self, name: str) -> int:
        """The id of mechanism token ``name`` the model was trained with (``special_tokens``)."""
        if name not in self.special_tokens:
            raise ConfigError(f"this model was not trained with <{name}> tokens (model.special_tokens has no "
                              f"{name!r}); pass the token id explicitly to use it anyway")
        return self.special_tokens[name]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict (a TOML table); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"invalid model config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
