"""Helpers for the mixers' state tests: weights under which the state matters, a sequence
fed in pieces through one state, and parts of that state lost on purpose.

A test that decoding equals the full pass proves little unless losing the state would
break the equality: the tests below run the same pieces once more with part of the state
zeroed before every piece and require a miss far beyond the tolerance.
"""

import torch
from torch import nn

from longctx.cache.ssm import SSMState
from longctx.layers.mamba import Mamba
from longctx.layers.mamba2 import Mamba2


@torch.no_grad()
def make_state_matter(model, seed=1):
    """Redraw ``model``'s weights in place so that its layers' states carry much of the logits.

    The init (std 0.02, SSM decays A = -(1..N), skip D = 1) leaves the SSM state's part of
    the logits near 1e-5.  Here every linear map has unit gain, and SSMs get slow decays
    (|A| in [0.02, 0.3]), steps dt in [0.1, 0.5] (so the state sums many inputs), B and C of
    size ~1 (from x_proj / in_proj, or drawn for the time-invariant Mamba) and a small skip
    D (0.1 randn), so the state, not the skip, makes the output.  Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=g)  # noqa: E731

    def softplus_inverse_of_uniform(shape, lo, hi):
        dt = lo + (hi - lo) * torch.rand(shape, generator=g)
        return dt + torch.log(-torch.expm1(-dt))

    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(randn(m.weight.shape) / m.in_features**0.5)
        if isinstance(m, (Mamba, Mamba2)):
            m.A_log.copy_((0.02 + 0.28 * torch.rand(m.A_log.shape, generator=g)).log())
            m.D.copy_(0.1 * randn(m.D.shape))
            bias = m.dt_proj.bias if isinstance(m, Mamba) and m.selective else m.dt_bias
            bias.copy_(softplus_inverse_of_uniform(bias.shape, 0.1, 0.5))
        if isinstance(m, Mamba) and not m.selective:
            m.B.copy_(randn(m.B.shape))
            m.C.copy_(randn(m.C.shape))
    return model


def run_pieces(model, ids, cuts, lose=None):
    """Logits of ``ids`` fed through one state as the pieces ``ids[:, a:b]`` between
    consecutive ``cuts`` (``cuts[0] = 0``); ``lose(state)``, if given, runs before every
    piece but the first."""
    state = model.init_state(ids.shape[0])
    out = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if lose is not None and i:
            lose(state)
        out.append(model(ids[:, a:b], state))
    return torch.cat(out, 1)


def state_parts(model):
    """``(layer, part)`` for each part of ``model``'s state: ``"ssm"`` (the SSM state) and
    ``"conv"`` (the conv tail) of state-space layers, ``"kv"`` (the KV cache) of attention
    layers."""
    return [(i, part) for i, s in enumerate(model.init_state(1).layers)
            for part in (("ssm", "conv") if isinstance(s, SSMState) else ("kv",))]


def forget(layer, part):
    """A ``lose`` for ``run_pieces``: zero ``part`` (see ``state_parts``) of the state of
    block ``layer``, in place; a KV cache keeps its positions and loses its keys and values."""

    def lose(state):
        s = state.layers[layer]
        if part == "kv":
            kept = s.state_dict()
            s.load_state_dict({k: v.zero_() if k in ("k", "v") else v for k, v in kept.items()})
        else:
            conv, ssm = (torch.zeros_like(x) if name == part else x for name, x in (("conv", s.conv), ("ssm", s.ssm)))
            s.update(conv, ssm, 0)

    return lose


def misses(actual, expected, tol):
    """How many times over its tolerance ``actual`` is: the largest |actual - expected| /
    (tol + tol |expected|), so ``torch.testing.assert_close(actual, expected, atol=tol,
    rtol=tol)`` passes exactly when this is <= 1."""
    return ((actual - expected).abs() / (tol + tol * expected.abs())).max().item()
