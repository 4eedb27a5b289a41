"""Selective scan (Mamba-1's S6 recurrence), its reference, and the one-token step.

Layout throughout: ``(batch, time, channels)`` for u, delta, z, y; A ``(channels, state)``;
B, C ``(batch, time, state)`` or ``(batch, time, groups, state)``; D, delta_bias
``(channels,)``; states ``(batch, channels, state)``.  Channel ``c`` reads group
``c // (channels // groups)``.

The recurrence, per channel ``c`` and state index ``n``::

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t
    y_t    = sum_n C_t[n] h_t[n] + D u_t ;   y_t *= silu(z_t) when z is given

- ``selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)``
  returns ``(y, final_state)``: y in u's dtype, the state in fp32, computed in fp32.
  Differentiable in every tensor argument and through the final state, so scanning in
  pieces equals one scan.  On CPU numba kernels (``kernels``; saved for backward: the
  inputs and a state every 16 steps, nothing of size time x channels x state; numba
  missing is an ImportError, not a silent fallback), on other devices torch ops over
  chunks under activation checkpointing (``chunked``).
- ``selective_scan_ref``: the same contract as a Python loop over time, in the widest
  input dtype (fp64 stays fp64); for tests and short inputs.
- ``ssm_step(u, delta, A, B, C, state, D, z, delta_bias, delta_softplus)``: one token in
  O(1) (generation); token by token it equals ``selective_scan`` from ``initial_state=state``.

Inputs are validated (shapes, floating dtypes, one device) with errors that name the
function and the argument.
"""

from longctx.ops.scan.autograd import selective_scan
from longctx.ops.scan.reference import selective_scan_ref, ssm_step

__all__ = ["selective_scan", "selective_scan_ref", "ssm_step"]
