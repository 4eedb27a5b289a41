"""Sequence-parallel selective scan, SSD and causal conv against the single-process ops.

Every rank builds the same full inputs (seeded, fp32, Mamba-like ranges), takes its shard,
runs the sequence-parallel op and backpropagates a fixed random linear loss on its local
output.  The test process puts the local outputs and gradients back in sequence order
(gradients of replicated parameters summed over ranks) and compares them with the
single-process op on the full sequence under the same loss.  One spawn per world size
runs every case in both layouts.
"""

import pytest
import torch
import torch.distributed as dist

from longctx.distributed.layout import LAYOUTS, local_positions
from longctx.distributed.ssm import local_chunks, previous_tokens, sequence_parallel_scan, sequence_parallel_ssd
from longctx.layers.mamba import causal_conv
from longctx.ops.scan import selective_scan
from longctx.ops.ssd import ssd
from tests.distributed.harness import run_ranks

BATCH = 2


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g)  # noqa: E731


# Each case: inputs(T) -> (tensors, names of the inputs sharded along time); run(tensors, sp) -> output,
# with sp = None for the single-process op on the full sequence, else dict(group=..., layout=...).


def _scan_inputs(T, full_options):
    r = _gen(1 if full_options else 2)
    channels, state, groups = 32, 16, 2
    A = -torch.exp(torch.log(torch.arange(1, state + 1.0))).expand(channels, state).clone()
    t = {"u": r(BATCH, T, channels), "A": A}
    if full_options:
        t.update(delta=r(BATCH, T, channels) - 4, B=r(BATCH, T, groups, state), C=r(BATCH, T, groups, state),
                 D=r(channels), z=r(BATCH, T, channels), delta_bias=0.5 * r(channels))
    else:
        t.update(delta=torch.nn.functional.softplus(r(BATCH, T, channels) - 4), B=r(BATCH, T, state),
                 C=r(BATCH, T, state))
    return t, {"u", "delta", "B", "C", "z"}


def _scan_run(t, sp, softplus):
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("delta_bias"), softplus)
    return selective_scan(*args)[0] if sp is None else sequence_parallel_scan(*args, **sp)


def _ssd_inputs(T, variant):
    r = _gen(3 + variant)
    heads, head_dim, state, groups = 4, 8, 16, (2 if variant == 0 else 1)
    t = {"x": r(BATCH, T, heads, head_dim), "dt": r(BATCH, T, heads) - 4,
         "A": -torch.exp(torch.log(torch.arange(1, heads + 1.0))),
         "B": r(BATCH, T, groups, state), "C": r(BATCH, T, groups, state)}
    if variant == 0:
        t.update(D=r(heads), dt_bias=0.5 * r(heads))
    else:
        t.update(D=r(heads, head_dim))
    return t, {"x", "dt", "B", "C"}


def _ssd_run(t, sp, variant):
    kw = dict(D=t["D"], dt_bias=t.get("dt_bias"), dt_softplus=True)
    kw.update(chunk_size=8) if variant == 0 else kw.update(chunk_size=16, dt_limit=(0.01, 0.05))
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    return ssd(*args, **kw)[0] if sp is None else sequence_parallel_ssd(*args, **kw, **sp)


KERNEL = 4


def _conv_inputs(T):
    r = _gen(5)
    return {"x": r(BATCH, T, 12), "weight": r(12, 1, KERNEL), "bias": r(12)}, {"x"}


def _conv_run(t, sp):
    x, w, b = t["x"], t["weight"], t["bias"]
    if sp is None:
        return causal_conv(x.transpose(1, 2), w, b, None)[0].transpose(1, 2)
    outs = [causal_conv(x_c.transpose(1, 2), w, b, prev.transpose(1, 2))[0]
            for x_c, prev in zip(local_chunks(x, sp["layout"]), previous_tokens(x, KERNEL - 1, **sp))]
    return torch.cat(outs, dim=2).transpose(1, 2)


def _prev_inputs(T):
    return {"x": _gen(6)(BATCH, T, 3)}, {"x"}


def _prev_run(t, sp, width, n_chunks):
    """Wider than a chunk: every chunk's previous ``width`` steps, chunk after chunk."""
    x = t["x"]
    if sp is not None:
        return torch.cat(previous_tokens(x, width, **sp), dim=1)
    L = x.shape[1] // n_chunks
    padded = torch.cat([x.new_zeros(BATCH, width, 3), x], dim=1)
    return torch.cat([padded[:, k * L: k * L + width] for k in range(n_chunks)], dim=1)


def _cases(T, n_chunks):
    width = 2 * (T // n_chunks) + 3
    return {
        "scan": (_scan_inputs(T, True), lambda t, sp: _scan_run(t, sp, True)),
        "scan_plain": (_scan_inputs(T, False), lambda t, sp: _scan_run(t, sp, False)),
        "ssd": (_ssd_inputs(T, 0), lambda t, sp: _ssd_run(t, sp, 0)),
        "ssd_limit": (_ssd_inputs(T, 1), lambda t, sp: _ssd_run(t, sp, 1)),
        "conv": (_conv_inputs(T), _conv_run),
        "prev_wide": (_prev_inputs(T), lambda t, sp: _prev_run(t, sp, width, n_chunks)),
    }


def _loss_weights(shape, seed=7):
    return _gen(seed)(*shape)


def _run_local(rank, world, layout, T, group, names):
    """This rank's output and gradients for each case (the loss weights are a shard of fixed full weights)."""
    n_chunks = world if layout == "contiguous" else 2 * world
    results = {}
    for name, ((full, sharded), run) in _cases(T, n_chunks).items():
        if name not in names:
            continue
        pos = local_positions(T, rank, world, layout)
        leaves = {k: (v[:, pos] if k in sharded else v).clone().requires_grad_() for k, v in full.items()}
        y = run(leaves, dict(group=group, layout=layout))
        out_total = y.shape[1] * world
        w = _loss_weights((y.shape[0], out_total, *y.shape[2:]))[:, local_positions(out_total, rank, world, layout)]
        grads = torch.autograd.grad((y * w).sum(), list(leaves.values()))
        results[name] = {"y": y.detach(), **{f"d_{k}": g for k, g in zip(leaves, grads)}}
        if world == 1 and name in ("scan", "ssd"):  # P == 1 is the single-process op itself
            results[name]["equal_to_op"] = torch.equal(y, run(leaves, None))
    return results


ALL = ("scan", "scan_plain", "ssd", "ssd_limit", "conv", "prev_wide")


def run_cases(rank, world, T):
    out = {layout: _run_local(rank, world, layout, T, None, ALL) for layout in LAYOUTS}
    if world == 4:  # two independent pairs: group is honoured (ranks and chunks within the group)
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        out["pair"] = _run_local(rank % 2, 2, "zigzag", T // 2, pairs[rank // 2], ("scan", "ssd"))
    return out


def _close(a, b, what, rtol=1e-5):
    """Elementwise rtol plus an absolute floor of rtol x max|b| (as tests/ops/test_scan.py)."""
    assert a.shape == b.shape, f"{what}: {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=rtol * max(b.abs().max().item(), 1e-30),
                               msg=lambda m: f"{what}: {m}")


def check(local_results, world, layout, T, names):
    n_chunks = world if layout == "contiguous" else 2 * world
    cases = _cases(T, n_chunks)
    for name in names:
        (full, sharded), run = cases[name]
        leaves = {k: v.clone().requires_grad_() for k, v in full.items()}
        y = run(leaves, None)
        grads = torch.autograd.grad((y * _loss_weights(y.shape)).sum(), list(leaves.values()))
        ref = {"y": y.detach(), **{f"d_{k}": g for k, g in zip(leaves, grads)}}
        for key, want in ref.items():
            parts = [res[name][key] for res in local_results]
            if key == "y" or key[2:] in sharded:  # this rank's rows of the sequence (or output) axis
                got = torch.empty_like(want)
                for r, part in enumerate(parts):
                    got[:, local_positions(want.shape[1], r, world, layout)] = part
            else:  # replicated parameter: each rank holds its part of the gradient
                got = sum(parts)
            _close(got, want, f"{name} {key} (world {world}, {layout})")
        if world == 1 and name in ("scan", "ssd"):
            assert local_results[0][name]["equal_to_op"], name


@pytest.mark.parametrize("world,T", [(1, 40), (2, 48), (4, 80)])
def test_sequence_parallel_equals_full_sequence(world, T):
    """Both layouts in one spawn (spawning costs more than the cases)."""
    results = run_ranks(run_cases, world, T)
    for layout in LAYOUTS:
        check([res[layout] for res in results], world, layout, T, ALL)
    if world == 4:
        for pair in (results[:2], results[2:]):
            check([res["pair"] for res in pair], 2, "zigzag", T // 2, ("scan", "ssd"))


def test_local_chunks():
    x = torch.arange(12.0).view(1, 12)
    assert [c.tolist() for c in local_chunks(x, "zigzag")] == [[list(range(6))], [list(range(6, 12))]]
    assert len(local_chunks(x, "contiguous")) == 1 and local_chunks(None) is None
    with pytest.raises(ValueError, match="2 equal chunks"):
        local_chunks(torch.zeros(1, 5), "zigzag")
