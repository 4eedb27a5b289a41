"""Recurrent state of one state-space layer: the causal conv's tail and the SSM state."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from longctx.cache.base import LayerState


class SSMState(LayerState):
    """``conv``: the last ``kernel - 1`` conv inputs, ``(batch, conv_channels, kernel - 1)``;
    ``ssm``: the SSM state, fp32 (``(batch, channels, state)`` for Mamba,
    ``(batch, heads, head_dim, state)`` for Mamba-2).  Both start at zero, so a fresh state
    and no state give the same outputs.  Size is constant, however long the sequence.

    With ``keep_undo`` an update keeps the parts it replaces, by reference: the layers
    replace both tensors on every update and never write into them, so the previous step
    costs no copy.
    """

    def __init__(self, batch_size: int, conv_shape: tuple[int, ...], ssm_shape: tuple[int, ...]) -> None:
        self.batch_size = batch_size
        self.conv_shape = (batch_size, *conv_shape)
        self.ssm_shape = (batch_size, *ssm_shape)
        self.conv: torch.Tensor | None = None
        self.ssm: torch.Tensor | None = None
        self.seq_len = 0
        self._keep_undo = False
        self._undo: tuple | None = None  # (conv, ssm, seq_len) before the last update

    def update(self, conv: torch.Tensor, ssm: torch.Tensor, n_tokens: int) -> None:
        """Replace both parts after ``n_tokens`` more tokens went through the layer."""
        if conv.shape != self.conv_shape or ssm.shape != self.ssm_shape:
            raise ValueError(
                f"state shapes {tuple(conv.shape)}, {tuple(ssm.shape)} do not match this layer's "
                f"{self.conv_shape}, {self.ssm_shape}"
            )
        if self._keep_undo:
            self._undo = (self.conv, self.ssm, self.seq_len)
        self.conv, self.ssm = conv, ssm
        self.seq_len += n_tokens

    def keep_undo(self) -> None:
        self._keep_undo = True

    def undo_step(self) -> None:
        if self._undo is None:
            raise self._nothing_to_undo()
        self.conv, self.ssm, self.seq_len = self._undo
        self._undo = None

    def reset(self) -> None:
        self.conv = self.ssm = None
        self.seq_len = 0
        self._undo = None

    def tensors(self) -> Iterable[torch.Tensor]:
        return [t for t in (self.conv, self.ssm) if t is not None]

    def fork(self) -> SSMState:
        """An independent copy: updating either state leaves the other as it was."""
        other = SSMState(self.batch_size, self.conv_shape[1:], self.ssm_shape[1:])
        other.load_state_dict(self.state_dict())
        return other

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.conv is None:
            return {}
        return {"conv": self.conv.detach().clone(), "ssm": self.ssm.detach().clone(),
                "seq_len": torch.tensor(self.seq_len)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        if state:
            seq_len = int(state["seq_len"])
            self.update(state["conv"], state["ssm"], seq_len)
            self._undo = None  # a restored state has no step to undo
