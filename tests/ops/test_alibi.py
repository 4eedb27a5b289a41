"""ALiBi against a reference written out here, independent of ``longctx.ops.alibi`` and of the
bias helper the library's attention paths share: the paper's slopes and a dense fp64 softmax
whose scores get ``-slope_h * (i - j)``.  Checked: the slopes, ``attention`` (blocked fused
path, sliding window, queries after cached keys, non-causal) and ``attention_ref``, dilated
attention, and the attention mixer decoding on a KV cache.  The sink cache's cache-order
distances are checked in tests/cache/test_sink.py with the same reference."""

import math

import pytest
import torch

from longctx.model import LanguageModel, ModelConfig
from longctx.ops import alibi_slopes, attention, attention_ref
from longctx.ops.dilated import dilated_attention, dilated_attention_ref


def paper_slopes(n: int) -> torch.Tensor:
    """Press et al., "Train Short, Test Long" (§3 and the official ``get_slopes``): for n a power
    of two the geometric sequence 2^(-8 i / n), i = 1..n; otherwise the slopes of the largest
    power of two below n followed by every other slope of the next power, as many as missing."""

    def geometric(m):
        return [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]

    low = 2 ** int(math.log2(n))
    return torch.tensor(geometric(low) + geometric(2 * low)[0::2][: n - low], dtype=torch.float64)


def alibi_reference(q, k, v, slopes, *, q_pos=None, k_pos=None, allowed=None):
    """Dense softmax attention in fp64 with the ALiBi score ``q_i . k_j / sqrt(d) - slope_h * (i - j)``
    for the query at position ``q_pos[i]`` and the key at ``k_pos[j]``.

    q ``(B, T, H, D)``, k/v ``(B, S, Hkv, D)`` (query head h reads kv head h // (H / Hkv)).  By
    default the queries are the last T of the key positions 0 .. S - 1 and ``allowed`` (broadcast
    to ``(H, T, S)``) is causal; a key after its query (non-causal) gets ``-slope * |i - j|``, as
    ``attention`` documents.  Returns out ``(B, T, H, D)`` and lse ``(B, T, H)``; a row with no
    allowed key gives 0 and -inf."""
    time, kv_time, heads = q.shape[1], k.shape[1], q.shape[2]
    q_pos = torch.arange(kv_time - time, kv_time) if q_pos is None else q_pos
    k_pos = torch.arange(kv_time) if k_pos is None else k_pos
    distance = (q_pos[:, None] - k_pos[None, :]).double()
    allowed = distance >= 0 if allowed is None else allowed
    group = heads // k.shape[2]
    k, v = (x.double().repeat_interleave(group, 2) for x in (k, v))
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k) / math.sqrt(q.shape[-1])
    scores = (scores - slopes.double()[:, None, None] * distance.abs()).masked_fill(~allowed, -math.inf)
    lse = scores.logsumexp(-1)
    p = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    return torch.einsum("bhts,bshd->bthd", p, v), lse.transpose(1, 2)


def _inputs(time, kv_time, heads, kv_heads, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, time, heads, dim, generator=g),
            *(torch.randn(1, kv_time, kv_heads, dim, generator=g) for _ in range(2)))


def _with_grads(fn, q, k, v, **kw):
    """out, lse and the gradients for q, k, v of a fixed random loss of both."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g).to(out.dtype)).sum()
    loss = loss + (lse * torch.randn(lse.shape, generator=g).to(lse.dtype)).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def _assert_bias_matters(out, out_without_bias):
    """Every head's outputs move by far more than the tolerances used here when the bias is dropped."""
    assert ((out - out_without_bias).abs().amax(dim=(0, 1, 3)) > 1e-2).all()


@pytest.mark.parametrize("n,exponents", [
    (1, [8]),
    (6, [2, 4, 6, 8, 1, 3]),
    (8, [1, 2, 3, 4, 5, 6, 7, 8]),
    (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),
])
def test_slopes_are_the_papers(n, exponents):
    """``alibi_slopes`` follows the paper, head counts that are not a power of two included
    (slopes 2^-e, the exponents written out by hand)."""
    want = torch.tensor([2.0**-e for e in exponents], dtype=torch.float64)
    torch.testing.assert_close(paper_slopes(n), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(alibi_slopes(n).double(), want, rtol=1e-6, atol=0)


CASES = {  # time, kv_time, heads, kv_heads, causal, window
    "blocks": (520, 520, 6, 2, True, None),  # three blocks of queries (256 rows each) with their bias
    "after-cached-keys": (5, 520, 12, 4, True, None),  # the queries are the last 5 positions
    "non-causal": (300, 300, 12, 3, False, None),
    "window": (300, 300, 6, 3, True, 50),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_written_out_alibi(case):
    """``attention`` and ``attention_ref`` with the paper's slopes give the written-out reference's
    out, lse and gradients, with GQA and 6 or 12 heads."""
    time, kv_time, heads, kv_heads, causal, window = CASES[case]
    q, k, v = _inputs(time, kv_time, heads, kv_heads)
    distance = torch.arange(kv_time - time, kv_time)[:, None] - torch.arange(kv_time)[None, :]
    allowed = (distance >= 0) if causal else torch.ones_like(distance, dtype=torch.bool)
    if window is not None:
        allowed &= distance < window
    slopes = paper_slopes(heads)
    want = _with_grads(alibi_reference, q.double(), k.double(), v.double(), slopes=slopes, allowed=allowed)
    _assert_bias_matters(want[0], alibi_reference(q, k, v, 0 * slopes, allowed=allowed)[0])
    for fn in (attention, attention_ref):
        got = _with_grads(fn, q, k, v, causal=causal, window=window, alibi_slopes=slopes.float())
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{fn.__name__} {name}: {m}")


def test_dilated_attention_matches_written_out_alibi():
    """LongNet (§2.2) with ALiBi at true distances: in pattern (w, r) head h keeps the positions p
    with (p mod w) mod r = h mod r, a kept query attends causally to the kept keys of its segment,
    and the patterns mix with weights proportional to their softmax denominators.  The training
    path, the inference path and ``dilated_attention_ref`` all give it."""
    time, heads, segs, rates = 40, 6, [8, 16, 40], [1, 2, 4]
    q, k, v = _inputs(time, time, heads, 2)
    slopes, pos, head = paper_slopes(heads), torch.arange(time), torch.arange(heads)[:, None]

    def reference(slopes):
        outs, lses = [], []
        for w, r in zip(segs, rates):
            kept = (pos % w % r)[None, :] == head % r  # (heads, time)
            same_segment = pos[:, None] // w == pos[None, :] // w
            allowed = kept[:, :, None] & kept[:, None, :] & same_segment & (pos[None, :] <= pos[:, None])
            out, lse = alibi_reference(q, k, v, slopes, allowed=allowed)
            outs.append(out)
            lses.append(lse)
        lse = torch.stack(lses).logsumexp(0)
        return sum(torch.exp(part - lse)[..., None] * out for out, part in zip(outs, lses)), lse

    want = reference(slopes)
    _assert_bias_matters(want[0], reference(0 * slopes)[0])
    kw = dict(segment_lengths=segs, dilation_rates=rates, alibi_slopes=slopes.float())
    training = dilated_attention(*(x.clone().requires_grad_() for x in (q, k, v)), **kw)
    with torch.no_grad():
        inference = dilated_attention(q, k, v, **kw)
    for name, got in (("training", training), ("inference", inference), ("ref", dilated_attention_ref(q, k, v, **kw))):
        for a, b in zip(got, want):
            torch.testing.assert_close(a.detach().double(), b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_mixer_decoding_and_full_pass_match_written_out_alibi():
    """The attention mixer with pos = "alibi" (6 heads over 2 kv heads, its own slopes): a full pass
    over 300 tokens, and a prefill of 260 tokens then one token at a time on a KV cache, both give
    the reference on the mixer's projections with the paper's slopes."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=8, d_model=48, layers=["attention"], n_heads=6, n_kv_heads=2, pos="alibi",
                         mlp_hidden=0, init_std=0.2)
    mixer = LanguageModel(config).blocks[0].mixer
    time = 300
    x = torch.randn(1, time, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = mixer(x)
        state = mixer.init_state(1)
        decoded = torch.cat([mixer(x[:, :260], state)] + [mixer(x[:, t : t + 1], state) for t in range(260, time)], 1)
        q, k, v = (y.reshape(1, time, -1, 8) for y in mixer.qkv(x).split([48, 16, 16], dim=-1))

        def reference(slopes):
            return mixer.out(alibi_reference(q, k, v, slopes)[0].float().reshape(1, time, 48))

        want = reference(paper_slopes(6))
        assert (want - reference(torch.zeros(6))).abs().max() > 1e-2
    torch.testing.assert_close(full, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, want, atol=1e-5, rtol=1e-5)
