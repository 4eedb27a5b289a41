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

``dilated_attention`` takes each pattern's kept positions as strided views (one per head
offset, or all offsets at once when the rate is at least the number of heads), runs the
fused attention kernel on batches of sparsified segments of bounded size and scatters the
results back: cost and memory O(time) for a fixed pattern set, never a time x time matrix,
and a short last segment is attended as it is (no padding enters a softmax).  Inference
merges each batch into the output as soon as it is computed; training keeps them for its
backward, which routes the gradient through the mix by hand into one buffer per input
(see ``_DilatedAttention``).
``dilated_attention_ref`` builds the dense boolean mask of every pattern instead.

Queries may be the last ``time`` of ``kv_time`` keys (bottom-right, as ``attention``), and
the keys may start at absolute position ``kv_start`` > 0: that is decoding with a cache
that dropped the keys no pattern can use any more (see ``first_needed_position``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from longctx.ops.attention import check_qkv, alibi_bias, attention


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
    check_qkv(q, k, v)
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

    def slopes(self, slopes: torch.Tensor) -> torch.Tensor:
        """ALiBi slopes of the kernel's heads; kept keys are ``step`` positions apart."""
        return slopes[self.first::self.step] * self.step

    def inputs(self, q, k, v, heads: int, extra):
        """The kernel's q, k, v for this piece (strided views or gathered copies)."""
        return (self.fold(self.q_view(q)), self.fold(self.kv_heads(self.kv_view(k), heads)),
                self.fold(self.kv_heads(self.kv_view(v), heads)))

    def add_grads(self, grads, extra_grads, gq, gk, gv, heads: int) -> None:
        """Add the kernel's input gradients into the full ``grads`` of q, k, v, in place."""
        self.q_view(grads[0]).add_(self.unfold(gq))
        self.add_kv_heads(self.kv_view(grads[1]), self.unfold(gk), heads)
        self.add_kv_heads(self.kv_view(grads[2]), self.unfold(gv), heads)


class AllOffsetsPiece(Piece):
    """One kernel call for every head of pattern rate ``r >= heads`` over ``n`` segments of
    ``length`` positions (``r | length``) made only of queries, starting at query index
    ``q_first`` and key index ``kv_first``; as many kv heads as heads.

    Head ``h`` keeps positions ``h + j r`` of each segment.  Viewing a segment as ``(length
    / r, r)`` positions, those are the diagonal of (offset, head): a strided view over all
    heads at once, ``(batch, n, length / r, heads, ...)``, that the kernel reads in place.
    One call per offset gave the kernel a single head of few segments, too little work to
    split evenly over the threads: batching the offsets made these patterns 5-45% faster
    (per pattern, 4K-64K tokens, 2 threads)."""

    def __init__(self, pattern: int, r: int, heads: int, n: int, length: int, q_first: int, kv_first: int) -> None:
        def view(t, first):
            x = t[:, first:first + n * length].unflatten(1, (n, length // r, r))
            return x[:, :, :, :heads].diagonal(0, 3, 4).movedim(-1, 3)

        super().__init__(pattern, lambda t: view(t, q_first), lambda t: view(t, kv_first), 0, 1, n)
        self.r = r

    def kv_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x

    def add_kv_heads(self, target: torch.Tensor, grad: torch.Tensor, heads: int) -> None:
        target.add_(grad)

    def slopes(self, slopes: torch.Tensor) -> torch.Tensor:
        return slopes * self.r

    @staticmethod
    def fits(r: int, heads: int, kv_heads: int, length: int) -> bool:
        """Rates below ``heads`` keep ``heads / r`` heads per offset, work enough for one
        call each; grouped kv heads would need a different offset within a group."""
        return kv_heads == heads and r >= heads and length % r == 0


# Query rows (position x head) of a batch element per kernel call at most, or one segment
# if that is more.  At head_dim 64 in fp32 a call's output is then 16 MiB, which glibc's
# malloc serves from its heap again once freed (up to its 32 MiB mmap threshold); larger
# blocks are mapped fresh from the OS on every call, and first-touching their pages took
# about a tenth of the time of an inference call at 256K tokens (2-core VM).
_CALL_ROWS = 1 << 16


def plan_pattern(pattern: int, w: int, r: int, heads: int, kv_heads: int, time: int, q_start: int,
                 kv_start: int) -> list[Piece]:
    """The pieces of pattern (w, r).  Full segments made only of queries go in batched
    calls of up to ``_CALL_ROWS`` query rows (``AllOffsetsPiece`` where it fits, else one
    per head offset), as does a short last segment whose length ``r`` divides when it
    fits; the others (the segment the queries start in, when it holds cached keys, and
    other short last segments) one call per head offset each."""
    q_end = q_start + time
    first_full, end_full = -(-q_start // w) * w, (q_end // w) * w
    segments = []  # irregular segments: (first key, end), absolute positions
    pieces = []
    if q_start % w:
        segments.append(((q_start // w) * w, min((q_start // w + 1) * w, q_end)))
    if q_end % w and end_full >= q_start:  # a short last segment (not the first one again)
        if AllOffsetsPiece.fits(r, heads, kv_heads, q_end - end_full):
            pieces.append(AllOffsetsPiece(pattern, r, heads, 1, q_end - end_full, end_full - q_start,
                                          end_full - kv_start))
        else:
            segments.append((end_full, q_end))
    n = max(0, (end_full - first_full) // w)  # full segments made only of queries
    all_offsets = AllOffsetsPiece.fits(r, heads, kv_heads, w)
    per_call = max(1, _CALL_ROWS // (w // r * (heads if all_offsets else -(-heads // r))))
    for first in range(first_full, first_full + n * w, per_call * w):
        m = min(per_call, (end_full - first) // w)
        if all_offsets:
            pieces.append(AllOffsetsPiece(pattern, r, heads, m, w, first - q_start, first - kv_start))
            continue
        for o in range(min(r, heads)):

            def q_view(t, a=first - q_start, m=m, o=o):
                return t[:, a:a + m * w].unflatten(1, (m, w))[:, :, o::r, o::r]

            def kv_view(t, a=first - kv_start, m=m, o=o):
                return t[:, a:a + m * w].unflatten(1, (m, w))[:, :, o::r]

            pieces.append(Piece(pattern, q_view, kv_view, o, r, m))
    for o in range(min(r, heads)):
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


def _attend(piece: Piece, q, k, v, causal: bool, scale: float, slopes, extra, leaves: bool):
    """The kernel on one piece: its inputs (made leaves needing grad if ``leaves``), out, lse."""
    inputs = piece.inputs(q, k, v, q.shape[2], extra)
    if leaves:
        inputs = tuple(x.detach().requires_grad_() for x in inputs)
    with torch.set_grad_enabled(leaves):
        out, lse = attention(*inputs, causal=causal, scale=scale,
                             alibi_slopes=None if slopes is None else piece.slopes(slopes))
    return inputs, out, lse


def _forward_online(q, k, v, pieces, causal: bool, scale: float, slopes, extra=()):
    """Inference: merge each piece into the running (out, lse) as soon as it is computed
    (``out = a out + b part`` with weights from the lse, as flash attention merges key
    blocks), so that at most one piece's output is alive.  Returns out (fp32), lse."""
    batch, time, heads, dim = q.shape
    out = q.new_zeros(batch, time, heads, dim, dtype=torch.float32)
    lse = q.new_full((batch, time, heads), -math.inf, dtype=torch.float32)
    for piece in pieces:
        _, part, part_lse = _attend(piece, q, k, v, causal, scale, slopes, extra, False)
        part, part_lse = piece.unfold(part).float(), piece.unfold(part_lse)
        o, o_lse = piece.q_view(out), piece.q_view(lse)
        both = torch.logaddexp(o_lse, part_lse)  # every kept query sees a key: part_lse is finite
        o.mul_(torch.exp(o_lse - both)[..., None]).addcmul_(torch.exp(part_lse - both)[..., None], part)
        o_lse.copy_(both)
    return out, lse


def _forward(q, k, v, pieces, n_patterns: int, causal: bool, scale: float, slopes, extra=()):
    """Training: attend every piece, keeping its kernel inputs (leaves) and outputs with
    their autograd graph for the backward, then mix.  Returns out (fp32), lse and per
    piece (kernel inputs, out, lse).  ``extra``: further key/value tensors some pieces
    read (sequence parallelism)."""
    batch, time, heads, dim = q.shape
    results = [_attend(piece, q, k, v, causal, scale, slopes, extra, True) for piece in pieces]
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
        out, lse, results = _forward(q, k, v, pieces, n_patterns, causal, scale, slopes, extra)
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
    check_qkv(q, k, v)
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
              for piece in plan_pattern(i, w, r, heads, k.shape[2], time, q_start, kv_start)]
    return attend_pieces(q, k, v, pieces, len(segs), causal=causal, scale=scale, alibi_slopes=alibi_slopes)


def attend_pieces(q, k, v, pieces: list[Piece], n_patterns: int, *, causal: bool, scale: float, alibi_slopes=None,
                  extra: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend and mix planned pieces (``plan_pattern``, or pieces reading key/values from
    ``extra``, as sequence parallelism does); differentiable in q, k, v and ``extra``."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *extra)):
        return _DilatedAttention.apply(q, k, v, pieces, n_patterns, causal, scale, alibi_slopes, *extra)
    out, lse = _forward_online(q, k, v, pieces, causal, scale, alibi_slopes, extra)
    return out.to(q.dtype), lse
