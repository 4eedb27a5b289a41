"""The state of a whole model: one state object per layer and the number of tokens seen."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
import torch

from longctx.cache.base import LayerState, storage_nbytes
from longctx.cache.memory import MemoryState


@dataclass
class ModelState:
    """Per-layer states (``layers[i]`` belongs to block ``i``) and the tokens consumed so far.

    ``extra`` holds session tensors beside the layers (generation keeps the token it has
    not fed yet and its sampler's RNG there); they are saved and restored with the state.
    ``memory`` is the recurrent memory of a memory-token model (``MemoryState``; None for
    other models), whose layer states hold the current segment only.
    """

    layers: list[LayerState]
    seq_len: int = 0
    batch_size: int = 1
    extra: dict[str, object] = field(default_factory=dict)
    memory: MemoryState | None = None

    def reset(self) -> None:
        for s in self.layers:
            s.reset()
        if self.memory is not None:
            self.memory.reset()
        self.seq_len = 0
        self.extra.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage held by the layers' states and ``extra``, each storage once."""
        tensors = [t for layer in self.layers for t in layer.tensors()]
        tensors += [] if self.memory is None else list(self.memory.tensors())
        return storage_nbytes(tensors + [t for t in self.extra.values() if isinstance(t, torch.Tensor)])

    def fork(self) -> ModelState:
        """An independent copy of the session (every layer's state and the ``extra``
        tensors): two continuations from one point, neither disturbing the other."""
        extra = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in self.extra.items()}
        memory = None if self.memory is None else self.memory.fork()
        return ModelState([s.fork() for s in self.layers], self.seq_len, self.batch_size, extra, memory)

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` tokens seen: every layer state must be able to
        (``rewind(n)``, as dense KV caches do), and there must be no memory tokens."""
        self._refuse_memory("forget tokens it has seen, as speculative decoding needs")
        unable = sorted({type(s).__name__ for s in self.layers if not hasattr(s, "rewind")})
        if unable:
            raise ValueError(f"{', '.join(unable)} cannot forget tokens it has seen, as speculative decoding "
                             "needs: use cache='dense' with an attention-only model")
        for s in self.layers:
            s.rewind(n)
        self.seq_len -= n

    def keep_undo(self) -> None:
        """Make every layer keep one step of history (``LayerState.keep_undo``), so that
        ``undo_step`` can take back the last token fed (backspace decoding); ``ValueError``
        for a layer state that cannot (a recall cache) and for memory tokens."""
        self._refuse_memory("take back the last token fed, as backspace decoding needs")
        for s in self.layers:
            s.keep_undo()

    def undo_step(self) -> None:
        """Return every layer to where it was before the last forward pass (``keep_undo``
        first); ``extra`` (pending token, RNG) is the caller's to set."""
        before = self.layers[0].seq_len
        for s in self.layers:
            s.undo_step()
        self.seq_len -= before - self.layers[0].seq_len

    def _refuse_memory(self, what: str) -> None:
        # A token that ended a segment also wrote the next memory and emptied the caches.
        if self.memory is not None:
            raise ValueError(f"a model with memory tokens cannot {what}: the token that ends a segment replaces "
                             "the memory and the segment's caches")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (``layers.{i}.{name}``, ``memory.{name}``, ``extra.{name}``),
        ready for safetensors."""
        out = {"seq_len": torch.tensor(self.seq_len)}
        for i, s in enumerate(self.layers):
            for name, t in s.state_dict().items():
                out[f"layers.{i}.{name}"] = t
        if self.memory is not None:
            out.update({f"memory.{name}": t for name, t in self.memory.state_dict().items()})
        for name, t in self.extra.items():
            if isinstance(t, torch.Tensor):
                out[f"extra.{name}"] = t.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a ``state_dict``; it must come from a model with the same layers."""
        if "seq_len" not in state:
            raise ValueError("saved state has no 'seq_len'; it was not written by ModelState.state_dict")
        seq_len = int(state["seq_len"])
        memory = {k[len("memory.") :]: v for k, v in state.items() if k.startswith("memory.")}
        if bool(memory) != (self.memory is not None):
            raise ValueError(f"saved state {'has' if memory else 'has no'} memory-token state; this model "
                             f"{'has no' if memory else 'has'} memory tokens: load it into the model it was saved "
                             "from")
        # Every layer holds something once a token was fed, except a memory-token state at a
        # segment boundary (its caches were emptied for the next segment).
        fed = seq_len if self.memory is None else int(memory.get("pos", 0))
        layer_ids = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
        if layer_ids - set(range(len(self.layers))) or (fed and len(layer_ids) != len(self.layers)):
            raise ValueError(
                f"saved state covers layers {sorted(layer_ids)}, this model has {len(self.layers)} layers; "
                "load it into the model it was saved from"
            )
        for i, s in enumerate(self.layers):
            prefix = f"layers.{i}."
            s.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        if self.memory is not None:
            self.memory.load_state_dict(memory)
        self.seq_len = seq_len
        self.extra = {k[len("extra.") :]: v for k, v in state.items() if k.startswith("extra.")}
