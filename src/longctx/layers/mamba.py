"""Mamba (selective state space) mixer, Gu & Dao 2023, with the paper's parameterisation.

Parameter names follow the reference implementation and Hugging Face's ``MambaMixer``
(``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``), so
checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longctx.cache.ssm import SSMState
from longctx.layers.registry import register_mixer
from longctx.ops.mamba_decode import mamba_decode_step
from longctx.ops.scan import selective_scan


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prefix: torch.Tensor | None):
    """Depthwise causal conv over time, continuing from ``prefix``.

    x ``(batch, channels, time)``; weight ``(channels, 1, kernel)``; prefix
    ``(batch, channels, kernel - 1)``, the inputs before ``x`` (zeros at the start).
    Returns the output ``(batch, channels, time)`` and the new prefix (the last
    ``kernel - 1`` inputs), so a sequence fed in pieces gives the output of one pass.
    """
    kernel = weight.shape[-1]
    if prefix is None:
        prefix = x.new_zeros(x.shape[0], x.shape[1], kernel - 1)
    full = torch.cat([prefix.to(x.dtype), x], dim=-1)
    if x.shape[-1] == 1:
        # One token (decoding): a dot product per channel; conv1d's setup costs ~10x more.
        out = (full * weight[:, 0]).sum(-1, keepdim=True)
        out = out if bias is None else out + bias[:, None]
    else:
        out = F.conv1d(full, weight, bias, groups=x.shape[1])
    return out, full[:, :, full.shape[-1] - (kernel - 1) :]


def inverse_softplus_dt(size: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Bias whose softplus is a step size log-uniform in ``[dt_min, dt_max]`` (paper init)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


@register_mixer("mamba")
class Mamba(nn.Module):
    """``x (batch, time, d_model) -> (batch, time, d_model)``.

    x -> in_proj -> (x, z); x -> causal conv (width ``ssm_conv``) -> SiLU -> x_proj ->
    (dt, B, C); dt -> dt_proj; selective scan with A = -exp(A_log), D, gate silu(z),
    softplus(dt + bias); out_proj.  With an ``SSMState`` the conv tail and the SSM state
    carry over, so pieces of any length give the output of one pass; one token costs O(1).

    ``config.ssm_selective = False`` gives the time-invariant ablation: no x_proj / dt_proj;
    the step is softplus(``dt_bias``) per channel and ``B``, ``C`` ``(state,)`` are learned
    constants, so the layer cannot choose what to remember (selective copying fails).
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        d_model, self.d_inner = config.d_model, config.ssm_expand * config.d_model
        self.d_state, self.dt_rank, self.kernel = config.ssm_state, config.ssm_dt_rank, config.ssm_conv
        self.dt_init = (config.ssm_dt_min, config.ssm_dt_max, config.ssm_dt_floor)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=config.ssm_bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, self.kernel, groups=self.d_inner,
                                bias=config.ssm_conv_bias)
        self.selective = config.ssm_selective
        if self.selective:
            self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
            self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            # The fused decode step reads these weights itself: quantize_model leaves them fp32.
            self.x_proj.weight_read_directly = self.dt_proj.weight_read_directly = True
        else:
            self.dt_bias = nn.Parameter(torch.empty(self.d_inner))
            self.B = nn.Parameter(torch.empty(self.d_state))
            self.C = nn.Parameter(torch.empty(self.d_state))
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.A_log.no_weight_decay = self.D.no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=config.ssm_bias)
        self.out_proj.is_residual_out = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init: S4D-real A, D = 1, dt bias = softplus^-1 of log-uniform steps,
        dt_proj weight U(+-dt_rank^-0.5), the conv as PyTorch initialises it; time-invariant
        B, C ~ N(0, 1 / state)."""
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        if self.selective:
            bound = self.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, *self.dt_init))
        else:
            self.dt_bias.copy_(inverse_softplus_dt(self.d_inner, *self.dt_init))
            nn.init.normal_(self.B, std=self.d_state**-0.5)
            nn.init.normal_(self.C, std=self.d_state**-0.5)
        self.conv1d.reset_parameters()

    def init_state(self, batch_size: int, max_len: int | None = None) -> SSMState:
        return SSMState(batch_size, (self.d_inner, self.kernel - 1), (self.d_inner, self.d_state))

    def forward(self, x: torch.Tensor, state: SSMState | None = None) -> torch.Tensor:
        batch, time, _ = x.shape
        if state is not None and time == 1 and state.ssm is not None and self.selective:
            return self.out_proj(self._decode(self.in_proj(x)[:, 0], state)[:, None])
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        conv_prefix = None if state is None else state.conv
        xs, new_prefix = self.conv(xs.transpose(1, 2), conv_prefix)
        xs = F.silu(xs).transpose(1, 2)  # (batch, time, d_inner)
        if self.selective:
            dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = F.linear(dt, self.dt_proj.weight)  # bias goes in as delta_bias (added in fp32)
            dt_bias = self.dt_proj.bias
        else:  # the step is softplus(dt_bias) alone
            dt, dt_bias = xs.new_zeros(batch, time, self.d_inner), self.dt_bias
            B, C = (p.to(xs.dtype).expand(batch, time, -1) for p in (self.B, self.C))
        A = -torch.exp(self.A_log.float())
        h0 = None if state is None else state.ssm
        y, h = self.scan(xs, dt, A, B, C, D=self.D, z=z, delta_bias=dt_bias, delta_softplus=True, initial_state=h0)
        if state is not None:
            state.update(new_prefix, h, time)
        return self.out_proj(y)

    # Seams that sequence parallelism (longctx.distributed) replaces on an instance; the
    # model code itself stays single-device.

    def conv(self, x: torch.Tensor, prefix: torch.Tensor | None):
        """Causal depthwise conv ``(batch, channels, time)`` continuing from ``prefix``; see causal_conv."""
        return causal_conv(x, self.conv1d.weight, self.conv1d.bias, prefix)

    def scan(self, *args, **kwargs):
        """The selective scan (``longctx.ops.scan.selective_scan``'s arguments and results)."""
        return selective_scan(*args, **kwargs)

    def _decode(self, xz: torch.Tensor, state: SSMState) -> torch.Tensor:
        """One token ``xz (batch, 2 * d_inner)`` -> y ``(batch, d_inner)``, state advanced:
        one fused kernel in inference, the same step in torch ops when gradients flow."""
        y, conv, h = mamba_decode_step(xz, state.conv, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                       self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D, state.ssm)
        state.update(conv, h, 1)
        return y
