"""The language model: embeddings, a stack of pre-norm blocks, a final norm and the LM head."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from longctx.cache.io import load_state, save_state
from longctx.cache.kv import KVCache
from longctx.cache.memory import MemoryState
from longctx.cache.model_state import ModelState
from longctx.cache.recall import RecallCache
from longctx.cache.sink import SinkKVCache
from longctx.layers import Block, RMSNorm, mixer_names
from longctx.layers.attention import Attention
from longctx.layers.quantized import QuantizedLinear
from longctx.layers.recall import CHUNK
from longctx.model.config import ConfigError, ModelConfig
from longctx.model.memory import MemoryTokens, memory_forward
from longctx.ops.dilated import attended_pairs

# Tokens per piece of a long input through a state with recall caches (LanguageModel.forward):
# a multiple of the layers' chunk, so that they attend in the chunks of one pass.
RECALL_PIECE = 4 * CHUNK


class LanguageModel(nn.Module):
    """``forward(ids (batch, time), state=None) -> logits (batch, time, vocab_size)``.

    With a state (``init_state``), the model continues from the tokens it has seen:
    ``forward(a, s)`` then ``forward(b, s)`` gives the logits of ``forward(cat(a, b))``
    for the positions of ``b``.  ``last_only=True`` gives the last position's logits only,
    ``(batch, 1, vocab_size)``: what generation needs after a prompt, without the LM head's
    matmul and memory for every prompt position.

    A state with recall caches takes a long input in pieces of ``RECALL_PIECE`` tokens
    through the whole model (its layers attend in the same chunks as in one pass), so
    activations are those of one piece however long the prompt.

    With ``model.memory_tokens`` the input is read in segments that pass on a memory
    (``longctx.model.memory``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        unknown = [name for name in config.layers if name not in mixer_names()]
        if unknown:
            raise ConfigError(
                f"model.layers names unknown mixer(s) {', '.join(map(repr, unknown))}; "
                f"available: {', '.join(mixer_names())}"
            )
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.pos == "learned" else None
        self.sink = nn.Parameter(torch.empty(config.d_model)) if config.sink_token else None
        self.memory = MemoryTokens(config) if config.memory_tokens else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(len(config.layers)))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * layers)
        (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * len(self.blocks)) if getattr(module, "is_residual_out", False) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.sink is not None:
            nn.init.normal_(self.sink, std=std)
        if self.memory is not None:
            self.memory.reset_parameters(std)
        # Mixers with parameters of their own kind (SSM step sizes, decays) set them last.
        for block in self.blocks:
            if hasattr(block.mixer, "reset_parameters"):
                block.mixer.reset_parameters()

    def init_state(self, batch_size: int = 1, max_len: int | None = None, **cache_options) -> ModelState:
        """A fresh state (empty caches) for ``batch_size`` sequences; ``max_len``, when known,
        lets caches allocate once.

        ``cache_options`` choose the attention layers' KV cache (``Attention.init_state``):
        ``cache="dense"`` (default), ``"sinks"`` (``sinks``, ``window``: StreamingLLM, which
        streams past ``model.max_seq_len`` in constant memory), ``"window"`` or ``"recall"``
        (sinks, window and retrieved blocks: InfLLM; ``block``, ``topk``, ``repr_tokens``,
        ``memory_dir``, ``positions``).  State-space
        layers keep a fixed-size state whatever the options, so they do not receive them.
        With memory tokens dense caches hold one segment at a time, and ``"sinks"`` makes the
        memory the sinks of a rolling window (``longctx.model.memory``).
        """
        memory = None
        if self.memory is not None:
            max_len, cache_options = self.memory.cache_options(self.config.layers, max_len, cache_options)
            memory = MemoryState(batch_size, self.memory.count)
        return ModelState(
            [b.init_state(batch_size, max_len, **(cache_options if isinstance(b.mixer, Attention) else {}))
             for b in self.blocks],
            batch_size=batch_size, memory=memory,
        )

    def position_limit(self, state: ModelState | None = None) -> int | None:
        """The most tokens a sequence may have, counting those ``state`` has seen:
        ``model.max_seq_len``, or None (no limit) when every attention layer of ``state``
        holds a sink, window or recall cache, whose queries reach a bounded span however long
        the stream (those caches refuse learned, absolute positions), or with memory tokens
        (every segment starts at position 0)."""
        if self.memory is not None:
            return None
        bounded = (SinkKVCache, RecallCache)
        caches = [] if state is None else [s for s in state.layers if isinstance(s, (KVCache, *bounded))]
        if caches and all(isinstance(s, bounded) for s in caches):
            return None
        return self.config.max_seq_len

    def fingerprint(self) -> dict:
        """Identifies this model for state files: its config and a digest of its weights
        (a strided sample of every tensor, so it is cheap even for large models)."""
        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)].float().cpu()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
        return {"config": self.config.to_dict(), "weights": h.hexdigest()}

    def save_state(self, state: ModelState, path) -> None:
        """Save a state (caches, recurrent states, pending generation) to a safetensors file."""
        save_state(state, path, self.fingerprint())

    def load_state(self, path, **cache_options) -> ModelState:
        """A state restored from ``save_state``'s file; refused if saved by a model with
        another config or other weights.  Pass the ``cache_options`` the state was made
        with (``init_state``), e.g. ``cache="sinks", sinks=4, window=252``."""
        return load_state(path, lambda batch_size: self.init_state(batch_size, **cache_options), self.fingerprint())

    def _check_ids(self, ids: torch.Tensor, start: int, limit: int | None) -> None:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"ids must be an integer tensor (batch, time); got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids))
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1}); "
                    "was the input encoded with this model's tokenizer?"
                )
        if limit is not None and start + ids.shape[1] > limit:
            raise ValueError(
                f"sequence of {start + ids.shape[1]} tokens exceeds this model's limit of {limit} "
                f"positions (model.max_seq_len); shorten the input"
            )

    def forward(self, ids: torch.Tensor, state: ModelState | None = None, *, last_only: bool = False) -> torch.Tensor:
        if state is not None and ids.shape[1] > RECALL_PIECE and any(isinstance(s, RecallCache) for s in state.layers):
            pieces = [self(ids[:, i : i + RECALL_PIECE], state, last_only=last_only)
                      for i in range(0, ids.shape[1], RECALL_PIECE)]
            return pieces[-1] if last_only else torch.cat(pieces, 1)
        start = 0 if state is None else state.seq_len
        # With model.sink_token, a fresh sequence starts with the learned sink (position 0);
        # its output is dropped, and a state counts it among the tokens seen.
        sink = self.sink is not None and start == 0
        self._check_ids(ids, start + sink, self.position_limit(state))
        if state is not None and state.batch_size != ids.shape[0]:
            raise ValueError(f"state was made for batch size {state.batch_size}; ids have {ids.shape[0]}")
        if self.memory is not None:
            return memory_forward(self, ids, state, last_only)
        x = self.embed(ids)
        if sink:
            x = torch.cat([self.sink.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed(self.positions(start, x.shape[1], ids.device))
        for i, block in enumerate(self.blocks):
            x = block(x, None if state is None else state.layers[i])
        if state is not None:
            state.seq_len += x.shape[1]
        x = x[:, -1:] if last_only else x[:, 1:] if sink else x
        return self.lm_head(self.norm(x))

    def positions(self, start: int, time: int, device) -> torch.Tensor:
        """Absolute positions ``(time,)`` of new tokens (a seam sequence parallelism replaces)."""
        return torch.arange(start, start + time, device=device)

    def num_parameters(self, embeddings: bool = True) -> int:
        """Trainable parameters, plus the weights quantized layers hold packed (a tied LM head
        quantized apart from the embedding is still the embedding's weight)."""
        n = sum(p.numel() for p in self.parameters())
        for name, m in self.named_modules():
            if isinstance(m, QuantizedLinear) and not (name == "lm_head" and self.config.tie_embeddings):
                n += m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
        if not embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int, *, backward: bool = True) -> float:
        """FLOPs per token at ``seq_len`` tokens, forward and backward (training) or forward
        only: ``2 N`` per token forward for the matmuls (PaLM, App. B) plus ``4 * head_dim``
        for each (query, key) pair a head attends to (q k and p v), averaged over the tokens;
        the backward costs twice the forward.  ``attention`` layers attend causally to every
        earlier token and themselves, or to the last ``attn_window``; ``dilated`` layers to
        their patterns' pairs (``attended_pairs``).  The Mamba scans are elementwise and not
        counted.  With memory tokens every ``memory_segment`` tokens cost a whole segment's
        positions (read memory, tokens, write slots), each attending within the segment."""
        if self.memory is not None and seq_len > self.memory.segment:
            span = self.memory.span()
            return self._flops_per_position(span, backward) * span / self.memory.segment
        return self._flops_per_position(seq_len, backward)

    def _flops_per_position(self, seq_len: int, backward: bool) -> float:
        """``flops_per_token`` of a sequence of ``seq_len`` positions run in one pass."""
        c = self.config
        matmul_params = self.num_parameters(embeddings=False)
        if c.tie_embeddings:  # the LM head is a matmul even when it shares the embedding
            matmul_params += self.lm_head.in_features * self.lm_head.out_features
        window = min(c.attn_window or seq_len, seq_len)
        # sum over t < seq_len of min(t + 1, window)
        dense_pairs = c.n_heads * (window * (window + 1) // 2 + (seq_len - window) * window)
        pairs = 0
        for name in c.layers:
            if name == "attention":
                pairs += dense_pairs
            elif name == "dilated":
                pairs += attended_pairs(seq_len, c.n_heads, c.dilated_segments, c.dilated_rates)
        forward = 2 * matmul_params + 4 * c.head_dim * pairs / seq_len
        return 3 * forward if backward else forward
