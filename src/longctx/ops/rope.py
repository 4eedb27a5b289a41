"""Rotary position embedding (RoPE) as a function, applied at arbitrary integer positions.

Pairing is "rotate half" (dimension ``i`` with ``i + head_dim/2``), as in Hugging Face
Llama, so imported checkpoints need no permutation.

Frequency scaling (``scaling``, a dict with a ``"rope_type"``) follows Hugging Face
transformers' ``modeling_rope_utils`` exactly, so imported checkpoints give its logits:

- ``"linear"`` (position interpolation): every frequency divided by ``factor``.
- ``"dynamic"`` (dynamic NTK): up to ``original_max_position_embeddings`` tokens, plain
  RoPE; beyond, the base grows with the sequence length ``L``:
  ``theta * (factor * L / original - (factor - 1)) ** (d / (d - 2))``.  ``L`` is the length
  of the sequence at the call (``seq_len``; default the largest position + 1), so the
  rotation of a position depends on how long the sequence is when it is computed.
- ``"llama3"``: long wavelengths divided by ``factor``, short ones kept, a smooth ramp
  between (``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
- ``"yarn"``: per-frequency blend of interpolation and extrapolation (``beta_fast``,
  ``beta_slow``, ``truncate``) and an attention factor (``attention_factor``, or from
  ``factor``, ``mscale``, ``mscale_all_dim``) that multiplies cos and sin, hence every
  rotated query and key.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from longctx.validation import positive_int

# rope_type -> (required keys, optional keys), "rope_type" aside.
ROPE_SCALINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate a RoPE scaling dict and return its normal form (a new dict: optional keys
    given as None dropped, numbers as float, lengths as int); raises ``ValueError`` naming
    the key and the allowed values."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"must be a dict with a 'rope_type' or None; got {scaling!r}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_type {kind!r} is not supported; supported: {', '.join(ROPE_SCALINGS)}")
    required, optional = ROPE_SCALINGS[kind]
    unknown = sorted(set(scaling) - {"rope_type", *required, *optional})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} for rope_type {kind!r}; "
                         f"allowed: {', '.join(('rope_type',) + required + optional)}")
    missing = [key for key in required if scaling.get(key) is None]
    if missing:
        raise ValueError(f"rope_type {kind!r} needs {', '.join(missing)}")
    out: dict[str, Any] = {"rope_type": kind}
    for key in required + optional:
        value = scaling.get(key)
        if value is None:
            continue
        if key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"truncate must be true or false; got {value!r}")
        elif key == "original_max_position_embeddings":
            positive_int("original_max_position_embeddings", value)
        elif not _number(value):
            raise ValueError(f"{key} must be a number; got {value!r}")
        elif key in ("factor", "attention_factor") and value <= 0:
            raise ValueError(f"{key} must be positive; got {value!r}")
        out[key] = value if key in ("truncate", "original_max_position_embeddings") else float(value)
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"llama3 needs high_freq_factor > low_freq_factor; got {out['high_freq_factor']} and "
                         f"{out['low_freq_factor']}")
    return out


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor cos and sin are multiplied by: 1 except for ``"yarn"`` (its
    ``attention_factor``, else ``0.1 ln(factor) + 1``, or the ratio of the ``mscale`` and
    ``mscale_all_dim`` versions when both are given)."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def rope_frequencies(
    head_dim: int, theta: float = 10000.0, device=None, *, scaling: dict[str, Any] | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Inverse frequencies ``(head_dim / 2,)`` fp32: ``theta ** (-2i / head_dim)``, scaled
    by ``scaling`` (module docstring).  ``seq_len`` is the sequence length, used by
    ``"dynamic"`` only (None: the original length, i.e. no scaling)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim; got {head_dim}")
    if theta <= 0:
        raise ValueError(f"rope theta must be positive; got {theta}")
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    if scaling is None:
        return (1.0 / theta**exponent).float()
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        inv_freq = 1.0 / theta**exponent / factor
    elif kind == "dynamic":
        if head_dim <= 2:
            raise ValueError(f"dynamic RoPE scaling needs head_dim > 2; got {head_dim}")
        original = scaling["original_max_position_embeddings"]
        length = original if seq_len is None else max(int(seq_len), original)
        base = theta * (factor * length / original - (factor - 1)) ** (head_dim / (head_dim - 2))
        inv_freq = 1.0 / base**exponent
    elif kind == "llama3":
        inv_freq = 1.0 / theta**exponent
        original = scaling["original_max_position_embeddings"]
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        original = scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate (divide by factor)
        pos_freqs = theta**exponent
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    else:
        raise ValueError(f"rope_type {kind!r} is not supported; supported: {', '.join(ROPE_SCALINGS)}")
    return inv_freq.float()


# On CPU, positions below this read their cos and sin from a cached table (built in fp64
# like the direct path, grown by doubling); beyond, and on other devices (where reading the
# largest position would wait for the device), they are computed per call.
TABLE_MAX = 1 << 16
_TABLES: dict[tuple, torch.Tensor] = {}


def _cos_sin(angles: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """fp64 angles ``(..., D/2)`` -> ``(..., 2, D)``: ``[cos, cos]`` and ``[-sin, sin]`` times
    ``factor``, in ``dtype``: what ``x * cos + rotate(x) * sin`` multiplies by."""
    cos, sin = torch.cos(angles) * factor, torch.sin(angles) * factor
    return torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=-2).to(dtype)


def _table(head_dim: int, theta: float, scaling: dict[str, Any] | None, size: int, device, dtype) -> torch.Tensor:
    """``_cos_sin`` of positions ``0 .. n - 1``, ``(n, 2, head_dim)``, n >= ``size``; cached."""
    key = (head_dim, theta, None if scaling is None else tuple(sorted(scaling.items())), str(device), dtype)
    table = _TABLES.get(key)
    if table is None or table.shape[0] < size:
        n = min(TABLE_MAX, max(1024, 1 << (size - 1).bit_length()))
        inv_freq = rope_frequencies(head_dim, theta, device=device, scaling=scaling).double()
        angles = torch.arange(n, device=device, dtype=torch.float64)[:, None] * inv_freq
        table = _TABLES[key] = _cos_sin(angles, rope_attention_factor(scaling), dtype)
    return table


def _from_table(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict[str, Any] | None,
                dtype: torch.dtype) -> torch.Tensor | None:
    """``_cos_sin`` of ``positions`` read from the cached table, ``(*positions.shape, 2, head_dim)``;
    None where the table does not apply: other devices, ``"dynamic"`` scaling (frequencies
    that follow the length), positions that are not integers in ``0 .. TABLE_MAX - 1``."""
    if positions.device.type != "cpu" or positions.is_floating_point() or not positions.numel():
        return None
    if scaling is not None and scaling["rope_type"] == "dynamic":
        return None
    low, top = (int(p) for p in torch.aminmax(positions))
    if low < 0 or top >= TABLE_MAX:
        return None
    table = _table(head_dim, theta, scaling, top + 1, positions.device, dtype)
    return table.index_select(0, positions.reshape(-1)).view(*positions.shape, 2, head_dim)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0, *,
                 scaling: dict[str, Any] | None = None, seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What ``rope`` multiplies by at ``positions`` ``(...,)``: ``(..., 2, head_dim)``, row 0
    ``[cos, cos]`` and row 1 ``[-sin, sin]`` (times YaRN's attention factor), from fp64
    angles; ``seq_len`` as in ``rope``."""
    if scaling is not None and scaling["rope_type"] == "dynamic" and seq_len is None and positions.numel():
        seq_len = int(positions.max()) + 1
    cos_sin = _from_table(positions, head_dim, theta, scaling, dtype)
    if cos_sin is None:
        inv_freq = rope_frequencies(head_dim, theta, device=positions.device, scaling=scaling, seq_len=seq_len)
        cos_sin = _cos_sin(positions.double()[..., None] * inv_freq.double(), rope_attention_factor(scaling), dtype)
    return cos_sin


def rope(
    x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0, *, scaling: dict[str, Any] | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Rotate ``x`` by its positions.

    Args:
        x: ``(batch, time, heads, head_dim)``.
        positions: integer ``(time,)`` or ``(batch, time)``: the position of each row.
        theta: base of the frequencies.
        scaling: optional frequency scaling (``check_rope_scaling``'s form; module docstring).
        seq_len: the sequence length for ``"dynamic"`` scaling; None: ``positions.max() + 1``,
            as transformers computes it.

    Returns:
        Tensor like ``x``.  Angles are computed in fp64 from the integer positions, so
        positions in the millions rotate as precisely as small ones.
    """
    if x.dim() != 4:
        raise ValueError(f"rope expects (batch, time, heads, head_dim); got shape {tuple(x.shape)}")
    if positions.shape[-1] != x.shape[1]:
        raise ValueError(f"positions has {positions.shape[-1]} entries for {x.shape[1]} time steps")
    head_dim = x.shape[-1]
    cos_sin = rope_cos_sin(positions.to(x.device), head_dim, theta, scaling=scaling, seq_len=seq_len, dtype=x.dtype)
    if cos_sin.dim() == 3:
        cos_sin = cos_sin[None]
    cos, sin = cos_sin[:, :, None, 0], cos_sin[:, :, None, 1]  # (B|1, T, 1, D)
    # Rotate half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); roll swaps the halves.
    return torch.addcmul(x * cos, x.roll(head_dim // 2, -1), sin)
