"""LongNet dilated attention (Ding et al. 2023, arXiv 2307.02486, §2.2), exact and differentiable.

Layout throughout: ``(batch, time, heads, head_dim)``.

A pattern ``(w, r)`` splits the positions into segments of ``w`` (aligned at position 0;
the last one may be shorter) and, inside each segment, keeps every ``r``-th position,
starting at the head's offset ``head % r`` (Eq. 13-15).  A kept query attends to the kept
keys of its own segment (causally when ``causal``).  A query a pattern does not keep gets
nothing from it (lse ``-inf``).  The patterns are mixed with weights proportional to their
softmax denominators (Eq. 9-10): ``out = sum_i exp(lse_i - lse) out_i`` with
``lse = logsumexp_i lse_i``, exactly ``merge`` of the partial attentions; gradients flow
through the weights (the official code detaches them).

``dilated_attention`` gathers each (pattern, head offset) into strided views, runs the fused
attention kernel on each batch of sparsified segments and scatters the results back:
cost and memory O(time) for a fixed pattern set, never a time x time matrix, and a short
last segment is attended as it is (no padding enters a softmax).  Its backward routes the
gradient through the mix by hand into one buffer per input (see ``_DilatedAttention``).
``dilated_attention_ref`` builds the dense boolean mask of every pattern instead.

Queries may be the last ``time`` of ``kv_time`` keys (bottom-right, as ``attention``), and
the keys may start at absolute position ``kv_start`` > 0: that is decoding with a cache
that dropped the keys no pattern can use any more (see ``first_needed_position``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from longctx.ops.attention import _check, alibi_bias, attention


def dilated_patterns(max_len: int, first_segment: int = 2048, ratio: int = 2) -> tuple[list[int], list[int]]:
    """The paper's geometric pattern set: segments ``first_segment * ratio**i`` and rates
    ``ratio**i`` until a segment covers ``max_len``, so every pattern keeps
    ``first_segment`` positions per segment and the total cost is linear in length.

    >>> dilated_patterns(8192)
    ([2048, 4096, 8192], [1, 2, 4])
    """
    if max_len < 1 or first_segment < 1 or ratio < 2:
        raise ValueError(f"need max_len >= 1, first_segment >= 1, ratio >= 2; got {max_len}, {first_segment}, {ratio}")
    segments, rates = [first_segment], [1]
    while segments[-1] < max_len:
        segments.append(segments[-1] * ratio)
        rates.append(rates[-1] * ratio)
    return segments, rates


def check_patterns(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate a pattern set; returns it as tuples of ints.

    Rules: as many rates as segment lengths (at least one); lengths strictly increasing;
    every rate between 1 and its segment length; one rate equal to 1, so that every
    position attends somewhere."""
    segs, rates = list(segment_lengths), list(dilation_rates)
    for name, values in (("segment_lengths", segs), ("dilation_rates", rates)):
        if not values or not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
            raise ValueError(f"{name} must be a non-empty list of integers; got {values!r}")
    if len(segs) != len(rates):
        raise ValueError(
            f"segment_lengths ({len(segs)} values) and dilation_rates ({len(rates)} values) must have the same length"
        )
    if segs[0] < 1 or any(b <= a for a, b in zip(segs, segs[1:])):
        raise ValueError(f"segment_lengths must be positive and strictly increasing (e.g. 2048, 4096, ...); got {segs}")
    for w, r in zip(segs, rates):
        if not 1 <= r <= w:
            raise ValueError(f"each dilation rate must be in 1..its segment length; got rate {r} for segment {w}")
    if 1 not in rates:
        raise ValueError(
            f"dilation_rates {rates} have no 1: some positions would belong to no pattern and attend to "
            "nothing; make the first rate 1 (as the paper's sets do)"
        )
    return tuple(segs), tuple(rates)


def attended_pairs(time: int, heads: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> int:
    """Causal (query, key) pairs that ``dilated_attention`` computes over ``time`` tokens,
    summed over patterns and heads, each query counting itself: its work, for FLOP counts
    (4 * head_dim FLOPs a pair forward).  Linear in ``time`` for a fixed pattern set, except
    where a segment is longer than ``time``: such a pattern covers all of it, at a cost
    quadratic in ``time / rate``."""
    total = 0
    for w, r in zip(segment_lengths, dilation_rates):
        full, last = divmod(time, w)
        for head in range(heads):
            offset = head % r
            for seg_len, count in ((w, full), (last, 1)):
                kept = max(0, -(-(seg_len - offset) // r))  # positions offset, offset + r, ... below seg_len
                total += count * kept * (kept + 1) // 2
    return total


def first_needed_position(position: int, segment_lengths: Sequence[int]) -> int:
    """The earliest key a query at ``position`` or later can attend to: the start of its
    segment in the pattern whose segment starts first.  Keys before it can be dropped."""
    return min((position // w) * w for w in segment_lengths)


# ---------------------------------------------------------------------------------------
# Reference


def _selected(pos: torch.Tensor, w: int, r: int, heads: int) -> torch.Tensor:
    """``(heads, len(pos))``: whether pattern (w, r) keeps absolute position ``pos`` for each head."""
    offset = torch.arange(heads, device=pos.device)[:, None] % r
    return (pos[None, :] % w) % r == offset


def dilated_attention_ref(q, k, v, *, segment_lengths, dilation_rates, causal: bool = True, scale=None,
                          alibi_slopes=None, kv_start: int = 0):
    """Dense reference: per pattern the exact ``(heads, time, kv_time)`` mask of allowed pairs,
    a masked softmax, then the mix.  Same arguments and results as ``dilated_attention``;
    computes in fp32 at least.  Memory O(time x kv_time): tests only."""
    segs, rates = check_patterns(segment_lengths, dilation_rates)
    _check(q, k, v)
    batch, time, heads, dim = q.shape
    kv_time = k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = dim**-0.5 if scale is None else scale
    group = heads // k.shape[2]
    kt = k.repeat_interleave(group, 2).to(dtype)
    vt = v.repeat_interleave(group, 2).to(dtype)
    k_pos = torch.arange(kv_start, kv_start + kv_time, device=q.device)
    q_pos = k_pos[kv_time - time:]
    s = torch.einsum("bthd,bshd->bhts", q.to(dtype), kt) * scale
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, q_pos, k_pos).to(dtype)
    outs, lses = [], []
    for w, r in zip(segs, rates):
        allowed = (q_pos[:, None] // w == k_pos[None, :] // w)[None]
        allowed = allowed & _selected(q_pos, w, r, heads)[:, :, None] & _selected(k_pos, w, r, heads)[:, None, :]
        if causal:
            allowed = allowed & (k_pos[None, None, :] <= q_pos[None, :, None])
        sp = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(sp, dim=-1)  # (batch, heads, time)
        p = torch.exp(sp - lse.clamp_min(torch.finfo(dtype).min)[..., None])
        outs.append(torch.einsum("bhts,bshd->bthd", p, vt))
        lses.append(lse.transpose(1, 2))
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(torch.exp(li - lse)[..., None] * oi for li, oi in zip(lses, outs))
    return out.to(q.dtype), lse


# ---------------------------------------------------------------------------------------
# Fast path


class Piece:
    """One kernel call of pattern ``pattern``: the query heads ``first::step`` (one head
    offset) over some of its segments.

    ``q_view(t)``: the strided view of a ``(batch, time, heads, ...)`` tensor that holds
    this piece's queries; ``kv_view(t)``: the view of a ``(batch, kv_time, kv_heads, ...)``
    tensor over the piece's key positions (all kv heads; ``kv_heads`` picks them).  A
    batched piece has a segment axis after batch, folded into batch for the kernel.
    """

    def __init__(self, pattern: int, q_view, kv_view, first: int, step: int, segments: int | None) -> None:
        self.pattern, self.q_view, self.kv_view = pattern, q_view, kv_view
        self.first, self.step, self.segments = first, step, segments

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.segments is None else x.flatten(0, 1)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.segments is None else x.unflatten(0, (-1, self.segments))

    def kv_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """The kv heads read by query heads first::step (GQA: head h reads h // group)."""
        dim = x.dim() - 2
        group = heads // x.shape[dim]
        if group == 1:
            return x[(slice(None),) * dim + (slice(self.first, None, self.step),)]
        return x.index_select(dim, self._kv_index(heads, group, x.device))

    def add_kv_heads(self, target: torch.Tensor, grad: torch.Tensor, heads: int) -> None:
        """The transpose of kv_heads: add ``grad`` into the view ``target``, in place."""
        dim = target.dim() - 2
        group = heads // target.shape[dim]
        if group == 1:
            target[(slice(None),) * dim + (slice(self.first, None, self.step),)] += grad
        else:
            target.index_add_(dim, self._kv_index(heads, group, target.device), grad)

    def _kv_index(self, heads: int, group: int, device) -> torch.Tensor:
        return torch.arange(self.first, heads, self.step, device=device) // group

    def inputs(self, q, k, v, heads: int, extra):
        """The kernel's q, k, v for this piece (strided views or gathered copies)."""
        return (self.fold(self.q_view(q)), self.fold(self.kv_heads(self.kv_view(k), heads)),
                self.fold(self.kv_heads(self.kv_view(v), heads)))

    def add_grads(self, grads, extra_grads, gq, gk, gv, heads: int) -> None:
        """Add the kernel's input gradients into the full ``grads`` of q, k, v, in place."""
        self.q_view(grads[0]).add_(self.unfold(gq))
        self.add_kv_heads(self.kv_view(grads[1]), self.unfold(gk), heads)
        self.add_kv_heads(self.kv_view(grads[2]), self.unfold(gv), heads)


def plan_pattern(pattern: int, w: int, r: int, heads: int, time: int, q_start: int, kv_start: int) -> list[Piece]:
    """The pieces of pattern (w, r).  Full segments made only of queries go in one batched
    call per head offset; the others (the segment the queries start in, when it holds
    cached keys, and a short last segment) one call each."""
    q_end = q_start + time
    first_full, end_full = -(-q_start // w) * w, (q_end // w) * w
    segments = []  # irregular segments: (first key, end), absolute positions
    if q_start % w:
        segments.append(((q_start // w) * w, min((q_start // w + 1) * w, q_end)))
    if q_end % w and end_full >= q_start:  # a short last segment (not the first one again)
        segments.append((end_full, q_end))
    pieces = []
    for o in range(min(r, heads)):
        if end_full > first_full:
            n = (end_full - first_full) // w

            def q_view(t, a=first_full - q_start, n=n, o=o):
                return t[:, a:a + n * w].unflatten(1, (n, w))[:, :, o::r, o::r]

            def kv_view(t, a=first_full - kv_start, n=n, o=o):
                return t[:, a:a + n * w].unflatten(1, (n, w))[:, :, o::r]

            pieces.append(Piece(pattern, q_view, kv_view, o, r, n))
        for seg_start, seg_end in segments:
            q0 = max(seg_start, q_start)
            p0 = q0 + (o - (q0 - seg_start)) % r  # first query position this offset keeps
            if p0 >= seg_end:
                continue

            def q_view(t, a=p0 - q_start, b=seg_end - q_start, o=o):
                return t[:, a:b:r, o::r]

            def kv_view(t, a=seg_start + o - kv_start, b=seg_end - kv_start):
                return t[:, a:b:r]

            pieces.append(Piece(pattern, q_view, kv_view, o, r, None))
    return pieces


def _forward(q, k, v, pieces, n_patterns: int, causal: bool, scale: float, slopes, keep_graph: bool, extra=()):
    """Attend every piece and mix.  Returns out (fp32), lse and per piece (kernel inputs,
    out, lse); with ``keep_graph`` the kernel inputs are leaves and the piece outputs keep
    their autograd graph (for the backward), otherwise only the outputs are kept.
    ``extra``: further key/value tensors some pieces read (sequence parallelism)."""
    batch, time, heads, dim = q.shape
    results = []
    for piece in pieces:
        inputs = piece.inputs(q, k, v, heads, extra)
        sl = None if slopes is None else slopes[piece.first::piece.step] * piece.step  # kept keys are r apart
        if keep_graph:
            inputs = tuple(x.detach().requires_grad_() for x in inputs)
        with torch.set_grad_enabled(keep_graph):
            out, lse = attention(*inputs, causal=causal, scale=scale, alibi_slopes=sl)
        results.append((inputs if keep_graph else None, out, lse))
    # Mix: lse of each pattern scattered to (batch, time, heads) (-inf where it keeps
    # nothing), their logsumexp, then each piece added with weight exp(lse_i - lse).
    lse_each = q.new_full((n_patterns, batch, time, heads), -math.inf, dtype=torch.float32)
    for piece, (_, _, part_lse) in zip(pieces, results):
        piece.q_view(lse_each[piece.pattern]).copy_(piece.unfold(part_lse.detach()))
    lse = torch.logsumexp(lse_each, dim=0)
    out = q.new_zeros(batch, time, heads, dim, dtype=torch.float32)
    for piece, (_, part, part_lse) in zip(pieces, results):
        weight = torch.exp(piece.unfold(part_lse.detach()) - piece.q_view(lse))
        piece.q_view(out).addcmul_(weight[..., None], piece.unfold(part.detach()).float())
    return out, lse, results


class _DilatedAttention(torch.autograd.Function):
    """Training path.  The backward takes each piece's share of the gradient through the
    mix (out = sum_i w_i out_i, w_i = exp(lse_i - lse)):

        d out_i = w_i d_out,   d lse_i = w_i (d_lse + <d_out, out_i - out>)

    runs the kernel's backward on the piece's own graph and adds the result into full
    gradient buffers through the same strided views: one full-size buffer per input,
    not one per piece as autograd through the views would allocate."""

    @staticmethod
    def forward(ctx, q, k, v, pieces, n_patterns, causal, scale, slopes, *extra):
        out, lse, results = _forward(q, k, v, pieces, n_patterns, causal, scale, slopes, True, extra)
        ctx.pieces, ctx.results, ctx.heads = pieces, results, q.shape[2]
        ctx.save_for_backward(out, lse)
        ctx.dtypes = [x.dtype for x in (q, k, v, *extra)]
        ctx.shapes = [x.shape for x in (q, k, v, *extra)]
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        out, lse = ctx.saved_tensors
        d_out = d_out.float()
        grads = [torch.zeros(shape, dtype=torch.float32, device=out.device) for shape in ctx.shapes]
        own, extra_grads = grads[:3], grads[3:]
        for piece, (inputs, part, part_lse) in zip(ctx.pieces, ctx.results):
            g_out = piece.q_view(d_out)
            weight = torch.exp(piece.unfold(part_lse.detach()) - piece.q_view(lse))
            d_part = weight[..., None] * g_out
            d_part_lse = weight * (piece.q_view(d_lse) + (g_out * (piece.unfold(part.detach()) - piece.q_view(out))).sum(-1))
            gq, gk, gv = torch.autograd.grad((part, part_lse), inputs,
                                             (piece.fold(d_part).to(part.dtype), piece.fold(d_part_lse)))
            piece.add_grads(own, extra_grads, gq, gk, gv, ctx.heads)
        del ctx.results  # the pieces' graphs are used once
        dq, dk, dv, *d_extra = (g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return (dq, dk, dv, None, None, None, None, None, *d_extra)


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = True,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    kv_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LongNet's dilated attention, exact.

    Args:
        q: ``(batch, time, heads, head_dim)``; the last ``time`` positions of the keys.
        k, v: ``(batch, kv_time, kv_heads, head_dim)``, ``heads % kv_heads == 0`` (GQA).
        segment_lengths, dilation_rates: the patterns (see ``check_patterns``).
        causal: a query sees kept keys at or before it; otherwise ``kv_time == time``.
        scale: score scale, default ``head_dim ** -0.5``.
        alibi_slopes: optional ``(heads,)``; the bias uses true distances.
        kv_start: absolute position of ``k[:, 0]`` (segments are aligned at position 0).

    Returns:
        out ``(batch, time, heads, head_dim)`` in q's dtype and lse ``(batch, time, heads)``
        fp32, the log of the mixed softmax denominator.  Differentiable, lse included.
    """
    segs, rates = check_patterns(segment_lengths, dilation_rates)
    _check(q, k, v)
    batch, time, heads, dim = q.shape
    kv_time = k.shape[1]
    if causal and kv_time < time:
        raise ValueError(f"causal attention needs at least as many keys as queries; got time={time}, kv_time={kv_time}")
    if not causal and kv_time != time:
        raise ValueError(f"non-causal dilated attention takes as many keys as queries; got {time} and {kv_time}")
    q_start = kv_start + kv_time - time
    for w in segs:
        if (q_start // w) * w < kv_start:
            raise ValueError(
                f"the keys start at position {kv_start}, but queries from position {q_start} need the keys of "
                f"their segment of {w}, from position {(q_start // w) * w} (see first_needed_position)"
            )
    scale = dim**-0.5 if scale is None else float(scale)
    pieces = [piece for i, (w, r) in enumerate(zip(segs, rates))
              for piece in plan_pattern(i, w, r, heads, time, q_start, kv_start)]
    return attend_pieces(q, k, v, pieces, len(segs), causal=causal, scale=scale, alibi_slopes=alibi_slopes)


def attend_pieces(q, k, v, pieces: list[Piece], n_patterns: int, *, causal: bool, scale: float, alibi_slopes=None,
                  extra: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend and mix planned pieces (``plan_pattern``, or pieces reading key/values from
    ``extra``, as sequence parallelism does); differentiable in q, k, v and ``extra``."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *extra)):
        return _DilatedAttention.apply(q, k, v, pieces, n_patterns, causal, scale, alibi_slopes, *extra)
    out, lse, _ = _forward(q, k, v, pieces, n_patterns, causal, scale, alibi_slopes, False, extra)
    return out.to(q.dtype), lse
