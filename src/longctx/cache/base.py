"""What every per-layer state provides.

A layer's state (``KVCache``, ``SinkKVCache``, ``SSMState``) is what the layer needs from
the tokens it has seen to process the next ones.  ``ModelState`` holds one per block and
relies only on this interface, as do session files, streaming evaluation and forking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch


class LayerState(ABC):
    """One layer's state for ``batch_size`` sequences.

    ``seq_len`` counts the tokens the layer has seen (kept or not).  ``state_dict`` gives
    tensors only (safetensors), and ``load_state_dict`` of a fresh state of the same layer
    restores it exactly; ``fork`` is an independent copy.
    """

    batch_size: int
    seq_len: int

    @abstractmethod
    def reset(self) -> None:
        """Forget every token: the state of a fresh sequence."""

    @abstractmethod
    def tensors(self) -> Iterable[torch.Tensor]:
        """The tensors the state holds (for ``nbytes``)."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state as named tensors; ``{}`` for a state that has seen nothing."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace this state with one from ``state_dict`` (raises ``ValueError`` if it does not fit)."""

    @abstractmethod
    def fork(self) -> LayerState:
        """An independent copy: updating either state leaves the other as it was."""

    def keep_undo(self) -> None:
        """From now on keep what ``undo_step`` needs: one step of history (backspace decoding).
        The history is not part of ``state_dict`` or ``fork``; ``reset`` forgets it."""
        raise ValueError(f"a {type(self).__name__} cannot take back the last token it was fed, as backspace "
                         "decoding needs: use a dense, sink or window cache")

    def undo_step(self) -> None:
        """Return to the state before the last update (after ``keep_undo``); raises
        ``ValueError`` when no step is kept (none since ``keep_undo``, or already undone)."""
        raise ValueError(f"a {type(self).__name__} cannot take back the last token it was fed")

    def _nothing_to_undo(self) -> ValueError:
        return ValueError(f"this {type(self).__name__} keeps no step to undo: call keep_undo() before the step; "
                          "one step is kept, so two undos in a row need a step between them")

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage held (allocated room included), each storage counted once."""
        return storage_nbytes(self.tensors())


def storage_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
