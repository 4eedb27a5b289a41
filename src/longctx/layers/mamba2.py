"""Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs"): scalar decay per head, SSD scan.

Parameter names follow the reference implementation and Hugging Face's ``Mamba2Mixer``
(``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm``, ``out_proj``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longctx.cache.ssm import SSMState
from longctx.layers.mamba import causal_conv, inverse_softplus_dt
from longctx.layers.registry import register_mixer
from longctx.ops.ssd import ssd, ssd_step


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x * silu(gate))`` over groups of ``group_size`` channels, times a weight."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float() * F.silu(gate.float())
        groups = h.unflatten(-1, (-1, self.group_size))
        h = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (self.weight * h).to(x.dtype)


@register_mixer("mamba2")
class Mamba2(nn.Module):
    """``x (batch, time, d_model) -> (batch, time, d_model)``.

    in_proj -> (z, xBC, dt); xBC -> causal conv -> SiLU -> (x, B, C); SSD scan with
    A = -exp(A_log) per head, D, softplus(dt + dt_bias); gated RMSNorm with z; out_proj.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        d_model = config.d_model
        self.d_inner = config.ssm_expand * d_model
        self.head_dim, self.n_groups, self.d_state = config.ssm_head_dim, config.ssm_groups, config.ssm_state
        self.n_heads = self.d_inner // self.head_dim
        self.kernel, self.chunk = config.ssm_conv, config.ssm_chunk
        self.dt_init = (config.ssm_dt_min, config.ssm_dt_max, config.ssm_dt_floor)
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=config.ssm_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                bias=config.ssm_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.A_log.no_weight_decay = self.D.no_weight_decay = self.dt_bias.no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=config.ssm_bias)
        self.out_proj.is_residual_out = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A = -(1..heads), D = 1, dt bias = softplus^-1 of log-uniform steps (reference init)."""
        self.A_log.copy_(torch.log(torch.arange(1, self.n_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(inverse_softplus_dt(self.n_heads, *self.dt_init))
        self.conv1d.reset_parameters()

    def init_state(self, batch_size: int, max_len: int | None = None) -> SSMState:
        return SSMState(batch_size, (self.conv_dim, self.kernel - 1),
                        (self.n_heads, self.head_dim, self.d_state))

    def forward(self, x: torch.Tensor, state: SSMState | None = None) -> torch.Tensor:
        batch, time, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        conv_prefix = None if state is None else state.conv
        xbc, new_prefix = self.conv(xbc.transpose(1, 2), conv_prefix)
        xbc = F.silu(xbc).transpose(1, 2)
        xs, B, C = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        xs = xs.unflatten(-1, (self.n_heads, self.head_dim))
        B = B.unflatten(-1, (self.n_groups, self.d_state))
        C = C.unflatten(-1, (self.n_groups, self.d_state))
        A = -torch.exp(self.A_log.float())
        h0 = None if state is None else state.ssm
        if state is not None and time == 1 and h0 is not None:
            y, h = ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0, D=self.D, dt_bias=self.dt_bias,
                            dt_softplus=True)
            y = y[:, None]
        else:
            y, h = self.scan(xs, dt, A, B, C, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                             initial_state=h0, chunk_size=self.chunk)
        if state is not None:
            state.update(new_prefix, h, time)
        return self.out_proj(self.norm(y.flatten(-2), z))

    # Seams that sequence parallelism (longctx.distributed) replaces on an instance.

    def conv(self, x: torch.Tensor, prefix: torch.Tensor | None):
        """Causal depthwise conv ``(batch, channels, time)`` continuing from ``prefix``; see causal_conv."""
        return causal_conv(x, self.conv1d.weight, self.conv1d.bias, prefix)

    def scan(self, *args, **kwargs):
        """The SSD scan (``longctx.ops.ssd.ssd``'s arguments and results)."""
        return ssd(*args, **kwargs)
