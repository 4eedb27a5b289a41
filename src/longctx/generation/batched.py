"""One decoding step for several independent sequences: continuous batching.

A server decodes sequences that arrived at different times, so their caches hold different
numbers of tokens, and a ``KVCache`` keeps one length for all its rows: they cannot share
one batched state.  ``batched_step`` keeps one batch-1 ``ModelState`` per sequence and
batches what does not depend on a sequence's past.  With ``B`` sequences:

- the embedding, every RMSNorm, the QKV and output projections, the SwiGLU MLP and the LM
  head run once on the ``B`` current tokens stacked, ``x (B, 1, d_model)``: one-sequence
  decoding is bound by reading the weights, and one step reads them once for all ``B``
  (until the arithmetic takes over: on two cores SmolLM2-135M's step is at 8);
- per sequence, on its own row ``qkv[b : b + 1] (1, 1, (heads + 2 kv_heads) head_dim)``,
  ``Attention.mix`` rotates q and k at that sequence's position, appends k and v to its
  cache and attends to the cache -> ``(1, 1, heads, head_dim)``; the rows are stacked back,
  ``(B, 1, heads * head_dim)``, for the output projection;
- the logits are ``(B, vocab)``, row ``b`` for sequence ``b``.

The common case takes a shorter way through the per-sequence part (``_attend_dense``):
fp32 dense KV caches (``KVCache``) on the CPU, RoPE (not dynamic) or no positions, no
attention window.  There ``Attention.rotate`` rotates the ``B`` rows in one call, each at its own
position ``(B, 1)``, and each sequence costs its cache's ``update`` and one call of the
decoding kernel's attention (``longctx.ops.decode_kernels.attend``) instead of a dozen
small torch ops: at 8 sequences and 30 layers those ops cost more than the matmuls.

The layers' own modules do the work (their linears, fp32 or quantized; ``Attention.mix``
with every cache policy it has: dense, sinks, window, recall), so each row equals that
sequence's own one-token forward up to the rounding of a matmul over more rows (and of
the kernel's summation order).  Models whose blocks are not all attention (Mamba, dilated
attention) are refused by ``unbatchable``, which says why: drive those one sequence at a
time.
"""

from __future__ import annotations

import torch

from longctx.cache.kv import KVCache
from longctx.cache.model_state import ModelState
from longctx.layers.attention import Attention

# Cached positions from which a sequence's attention in a batched step runs on numba's
# threads.  Below, its work (~0.1 ms at 2048 keys and 9 heads of 64) gains less from a
# second thread than waiting for that thread can cost on a busy machine (ms per call).
PARALLEL_KEYS = 2048


def unbatchable(model, state: ModelState) -> str | None:
    """Why ``state`` of ``model`` cannot take part in ``batched_step``; None when it can."""
    from longctx.model.lm import LanguageModel

    if type(model) is not LanguageModel:
        return f"batched decoding runs longctx's LanguageModel, not {type(model).__name__}"
    if state.batch_size != 1:
        return f"batched decoding takes batch-1 states (one per sequence); this one has batch {state.batch_size}"
    if getattr(model, "memory", None) is not None:  # memory tokens: model.forward reads input in segments
        return "batched decoding does not cover memory tokens (the model's forward passes a memory between segments)"
    others = sorted({type(b.mixer).__name__ for b in model.blocks if type(b.mixer) is not Attention})
    if others:
        return f"batched decoding covers attention layers only; this model also has {', '.join(others)} layers"
    return None


@torch.no_grad()
def batched_step(model, tokens: torch.Tensor, states: list[ModelState]) -> torch.Tensor:
    """Feed ``tokens (B,)``, token ``b`` to ``states[b]`` (each batch 1, past its prompt),
    and return the logits ``(B, vocab)`` of the next position of each (module docstring)."""
    if tokens.shape != (len(states),):
        raise ValueError(f"one token per state: got tokens of shape {tuple(tokens.shape)} for {len(states)} states")
    for state in states:
        reason = unbatchable(model, state)
        if reason is not None:
            raise ValueError(reason)
        limit = model.position_limit(state)
        if state.seq_len == 0:  # a fresh sequence may need the learned sink first: prefill it
            raise ValueError("batched steps continue sequences: prefill each state's prompt first")
        if limit is not None and state.seq_len + 1 > limit:
            raise ValueError(f"a sequence of {state.seq_len + 1} tokens exceeds this model's limit of {limit} "
                             "positions (model.max_seq_len)")
    positions = torch.tensor([[s.seq_len] for s in states], device=tokens.device)  # (B, 1)
    x = model.embed(tokens[:, None])  # (B, 1, d_model)
    if model.pos_embed is not None:
        x = x + model.pos_embed(positions)
    for i, block in enumerate(model.blocks):  # Block.forward, its mixer split around the per-sequence part
        attn, caches = block.mixer, [s.layers[i] for s in states]
        qkv = attn.qkv(block.mixer_norm(x))
        if _dense_kernel(attn, caches, qkv):
            mixed = _attend_dense(attn, qkv, caches, positions)
        else:
            mixed = torch.cat([attn.mix(qkv[b : b + 1], cache) for b, cache in enumerate(caches)])
        x = x + attn.out(mixed.reshape(len(states), 1, -1))
        if block.mlp is not None:
            x = x + block.mlp(block.mlp_norm(x))
    for state in states:
        state.seq_len += 1
    return model.lm_head(model.norm(x))[:, -1]


def _dense_kernel(attn: Attention, caches: list, qkv: torch.Tensor) -> bool:
    """Whether a layer's per-sequence part can take ``_attend_dense`` (module docstring)."""
    dynamic = (attn.rope_scaling or {}).get("rope_type") == "dynamic"  # its angles follow each sequence's length
    return (qkv.device.type == "cpu" and qkv.dtype == torch.float32 and attn.pos in ("rope", "none")
            and not (attn.pos == "rope" and dynamic) and attn.window is None
            and all(isinstance(c, KVCache) for c in caches))


def _attend_dense(attn: Attention, qkv: torch.Tensor, caches: list[KVCache], positions: torch.Tensor) -> torch.Tensor:
    """``Attention.mix`` of ``qkv (B, 1, (heads + 2 kv_heads) head_dim)``, sequence ``b`` at
    ``positions[b]`` with cache ``caches[b]``, by the decoding kernel -> ``(B, heads *
    head_dim)``."""
    import numba

    from longctx.ops import decode_kernels as kernels

    batch = qkv.shape[0]
    heads, kv_heads, dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qk = qkv[..., : (heads + kv_heads) * dim].reshape(batch, 1, heads + kv_heads, dim)
    if attn.pos == "rope":
        qk = attn.rotate(qk, positions, int(positions.max()) + 1)
    v = qkv[..., (heads + kv_heads) * dim :].reshape(batch, 1, kv_heads, dim)
    out = torch.empty(batch, heads * dim)
    threads = numba.get_num_threads()
    for b, cache in enumerate(caches):
        cache.update(qk[b : b + 1, :, heads:], v[b : b + 1])
        k_store, v_store, lo, hi = cache.head_major()
        q = qk[b, 0, :heads].contiguous().view(-1)
        # A short cache's attention runs on this thread alone (PARALLEL_KEYS); a long one is
        # split over numba's threads in pieces, as fast_decode's.
        parallel = hi - lo >= PARALLEL_KEYS
        numba.set_num_threads(threads if parallel else 1)  # this thread's setting only
        try:
            kernels.attend(q.numpy(), k_store[0].numpy(), v_store[0].numpy(), lo, hi, heads, dim**-0.5,
                           out[b].numpy(), 2 * threads if parallel else 1)
        finally:
            numba.set_num_threads(threads)
    return out
