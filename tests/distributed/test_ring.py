"""ring_attention on 1, 2 and 4 gloo ranks against single-process attention on the full sequence."""

import functools
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longctx.distributed.layout import chunk_ids, gather_sequence, shard_sequence
from longctx.distributed.ring import _dense_grads, _flash_grads, _plan, ring_attention
from longctx.ops import attention
from longctx.ops.attention import attention_ref
from tests.distributed.harness import run_ranks

BATCH, DIM = 2, 8

# (ring size or None for the whole world, causal, layout, total length, heads, kv heads).  Lengths
# are not powers of two (24 over 4 zigzag ranks: chunks of 3); subgroups test P == 1 and peers
# given as global ranks.
CASES = {
    2: [
        (None, True, "contiguous", 12, 4, 4),
        (None, True, "zigzag", 12, 4, 2),
        (None, False, "contiguous", 10, 4, 2),
        (None, False, "zigzag", 12, 4, 4),
        (1, True, "zigzag", 6, 4, 2),
        (1, False, "contiguous", 5, 4, 4),
    ],
    4: [
        (None, True, "zigzag", 24, 4, 2),
        (None, True, "contiguous", 20, 4, 4),
        (None, False, "zigzag", 24, 4, 2),
        (None, False, "contiguous", 12, 4, 1),
        (2, True, "zigzag", 12, 4, 2),
    ],
}
NAMES = ("out", "lse", "dq", "dk", "dv")


def _inputs(total, heads, kv_heads):
    """Full q, k, v and the loss weights d_out, d_lse, the same in every process."""
    g = torch.Generator().manual_seed(total * 100 + heads * 10 + kv_heads)
    q = torch.randn(BATCH, total, heads, DIM, generator=g)
    k, v = (torch.randn(BATCH, total, kv_heads, DIM, generator=g) for _ in range(2))
    return q, k, v, torch.randn(BATCH, total, heads, DIM, generator=g), torch.randn(BATCH, total, heads, generator=g)


def _results(fn, q, k, v, d_out, d_lse, **kw):
    """out, lse and the gradients of sum(out * d_out) + sum(lse * d_lse)."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **kw)
    loss = (out * d_out).sum() + (lse * d_lse).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def run_cases(rank, world, cases):
    """Every case on this rank; results gathered into full sequences."""
    groups = {None: None}
    for size in sorted({case[0] for case in cases} - {None}):
        groups[size] = dist.new_subgroups(size)[0]  # collective: every rank makes every subgroup
    results = {}
    for case in cases:
        size, causal, layout, total, heads, kv_heads = case
        group = groups[size]
        local = [shard_sequence(x, group, layout) for x in _inputs(total, heads, kv_heads)]
        parts = _results(ring_attention, *local, group=group, causal=causal, layout=layout)
        results[case] = [gather_sequence(x, group, layout) for x in parts]
    return results


@functools.cache
def _ring_results(world):
    """Rank 0's results of every case for ``world`` ranks (one spawn per world size)."""
    return run_ranks(run_cases, world, CASES[world])[0]


def check_case(ring, case):
    """``ring``: one case's results from ``run_cases`` (full sequences) against single-process attention."""
    _, causal, _, total, heads, kv_heads = case
    ref = _results(attention, *_inputs(total, heads, kv_heads), causal=causal)
    for name, a, b in zip(NAMES, ring, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} {name}: {m}")


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in CASES.items() for c in cases])
def test_matches_single_process_attention(world, case):
    check_case(_ring_results(world)[case], case)


def test_zigzag_plan_is_one_call_per_step_and_balanced():
    """Under a causal mask every zigzag rank makes one kernel call per step (its own block: one
    square causal call) and attends the same number of (query, key) rows overall."""
    world, size = 4, 3
    work = set()
    for rank in range(world):
        plans = [_plan(chunk_ids(rank, world, "zigzag"), chunk_ids((rank - s) % world, world, "zigzag"), True, size)
                 for s in range(world)]
        assert [len(p) for p in plans] == [1] * world
        assert plans[0] == [(slice(0, 2 * size), 2 * size, True)]
        work.add(sum((rows.stop - rows.start) * keys for p in plans for rows, keys, _ in p))
    assert len(work) == 1


def test_rejects_bad_arguments():
    """Checked before any communication, so no process group is needed."""
    q, k = torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, k, k, layout="diagonal")
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        ring_attention(q, torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8))
    with pytest.raises(ValueError, match="must match q"):
        ring_attention(q, torch.zeros(1, 5, 2, 8), torch.zeros(1, 5, 2, 8))
    with pytest.raises(ValueError, match="one shape"):
        ring_attention(q, k, torch.zeros(1, 4, 1, 8))


# ----------------------------------------------------------------------------- block gradients


@pytest.mark.parametrize("grads", ["flash", "dense"])
@pytest.mark.parametrize("causal,second", [(False, 5), (True, 7), (True, 11)])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("with_lse", [False, True])
def test_block_grads_sum_to_the_whole_attention_gradients(grads, causal, second, kv_heads, with_lse):
    """Given the whole attention's out and lse, each key block's share (kernel backwards only, no
    forward recompute) sums to the gradients of the whole; causal: 6 keys fully seen, then
    ``second`` keys bottom-right aligned with the 7 queries (square or offset)."""
    fn = {"flash": _flash_grads, "dense": _dense_grads}[grads]
    g = torch.Generator().manual_seed(second * 10 + kv_heads)
    q = torch.randn(2, 7, 4, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 6 + second, kv_heads, 8, generator=g, requires_grad=True) for _ in range(2))
    d_out, d_lse = torch.randn(2, 7, 4, 8, generator=g), torch.randn(2, 7, 4, generator=g)
    out, lse = attention_ref(q, k, v, causal=causal, scale=0.3)
    loss = (out * d_out).sum() + ((lse * d_lse).sum() if with_lse else 0)
    want = torch.autograd.grad(loss, (q, k, v))
    args = (out.detach(), lse.detach(), d_out, d_lse if with_lse else None)
    qa, ka, va = fn(q.detach(), k.detach()[:, :6], v.detach()[:, :6], *args, False, 0.3)
    qb, kb, vb = fn(q.detach(), k.detach()[:, 6:], v.detach()[:, 6:], *args, causal, 0.3)
    for name, got, ref in zip(("dq", "dk", "dv"), (qa + qb, torch.cat([ka, kb], 1), torch.cat([va, vb], 1)), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- more ring cases


class _TensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages ops create while active and that are still alive."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.live = {}

    def _freed(self, key):
        self.now -= self.live.pop(key, (0,))[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if st.nbytes() and key not in inputs and key not in self.live:
                    self.live[key] = (st.nbytes(), weakref.ref(st, lambda _, key=key: self._freed(key)))
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
        return out


def _sent_bytes(layout):
    """Bytes this rank sends to the next in a forward and in a backward (local q of 6 tokens, 4
    heads over 2 kv heads, fp32), counted at ``dist.batch_isend_irecv``, which carries all of the
    ring's traffic; with those of a local k for scale."""
    sent = []
    send = dist.batch_isend_irecv

    def counting(ops):
        sent.extend(op.tensor.nbytes for op in ops if op.op is dist.isend)
        return send(ops)

    q, k, v, d_out, _ = (shard_sequence(x, None, layout) for x in _inputs(24, 4, 2))
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    dist.batch_isend_irecv = counting
    try:
        out, _ = ring_attention(q, k, v, layout=layout)
        forward = sum(sent)
        (out * d_out).sum().backward()
    finally:
        dist.batch_isend_irecv = send
    return forward, sum(sent) - forward, k.nbytes


def _more_cases(rank, world):
    """Losses of out only, of lse only, two backward passes through a retained graph, the peak
    tensor memory of a forward and backward (in units of the local q) and the bytes sent."""
    results = {}
    for layout in ("contiguous", "zigzag"):
        q, k, v, d_out, d_lse = (shard_sequence(x, None, layout) for x in _inputs(24, 4, 2))
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse = ring_attention(q, k, v, layout=layout)
        grads = [torch.autograd.grad((out * d_out).sum(), (q, k, v), retain_graph=True)]
        grads.append(torch.autograd.grad((lse * d_lse).sum(), (q, k, v), retain_graph=True))
        loss = (out * d_out).sum() + (lse * d_lse).sum()
        first = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
        second = torch.autograd.grad(loss, (q, k, v))
        parts = [out.detach(), lse.detach(), *[x for g in grads for x in g], *first, *second]
        results[layout] = [gather_sequence(x, None, layout) for x in parts]

        local, heads, dim = 256, 4, 32  # MHA: a k/v block is two q-sized tensors
        q, k, v = (torch.randn(1, local, heads, dim, requires_grad=True) for _ in range(3))
        w = torch.randn(1, local, heads, dim)
        with _TensorBytes() as counter:
            out, _ = ring_attention(q, k, v, layout=layout)
            (out * w).sum().backward()
        results[layout + " peak"] = counter.peak / q.nbytes
        results[layout + " bytes"] = _sent_bytes(layout)
    return results


@functools.cache
def _more_results():
    return run_ranks(_more_cases, 4)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_gradients_of_out_or_lse_alone_and_through_a_retained_graph(layout):
    """A loss of out alone (no lse gradient) or of lse alone (no out gradient), and a graph
    backpropagated twice (the backward reuses its saved block as a ring buffer only when the
    graph is not kept): all equal single-process attention's gradients."""
    ring = _more_results()[0][layout]
    q, k, v, d_out, d_lse = _inputs(24, 4, 2)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = attention(q, k, v, causal=True)
    want = [out.detach(), lse.detach(), *torch.autograd.grad((out * d_out).sum(), (q, k, v), retain_graph=True),
            *torch.autograd.grad((lse * d_lse).sum(), (q, k, v), retain_graph=True)]
    both = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), (q, k, v))
    want += [*both, *both]
    assert len(ring) == len(want)
    for i, (a, b) in enumerate(zip(ring, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_forward_and_backward_memory_is_a_few_local_blocks(layout):
    """Tensor memory of a forward and backward over 4 ranks, in units of the local q (a k/v block
    is 2): the kept block 2 and out 1, then d_out 1, dq 1, a step's kernel outputs 3 (dq and the
    block's dk/dv share), the next block arriving 2 (the kept block is the other buffer) and the
    dk/dv of two blocks in flight 4 (one going out, one coming in): 14, whatever the number of
    ranks.  No copies of q or of blocks per step, no recompute (the first version peaked at 28.5)."""
    peaks = [r[layout + " peak"] for r in _more_results()]
    assert max(peaks) <= 15, peaks


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_sends_exactly_the_ideal_bytes(layout):
    """Each of 4 ranks sends (P - 1) K/V blocks in the forward (the README's claim) and, in the
    backward, (P - 1) K/V blocks and P dk/dv blocks (fp32 here): no block twice, none extra, and
    GQA blocks travel with their 2 kv heads only.  A block is this rank's k and v."""
    world = 4
    for forward, backward, k_bytes in (r[layout + " bytes"] for r in _more_results()):
        assert forward == (world - 1) * 2 * k_bytes
        assert backward == (world - 1) * 2 * k_bytes + world * 2 * k_bytes
