"""Pauses, filler, backspace and memory tokens in task runs: the ids a run gives the
mechanism tokens, and what each option changes in training batches and evaluation examples.

Ids: in a task of ``V`` tokens (``TaskConfig.vocab_size``) ``<pause>`` is ``V``, ``<mem>``
``V + 1`` and ``<backspace>`` ``V + 2``, and the model has ``V + 3`` embeddings, when the run
uses any of them (``mechanism_ids``); other runs keep ``V``, so their configs and
checkpoints are as before.

A training batch is the task generator's ``(inputs, targets)`` transformed, in this order
(``train_transform``; the loss masks are the transforms', ``longctx.data.pause`` and
``longctx.data.backspace``):

1. ``pretrain_pauses`` pauses at random places of every sequence (``insert_pauses``);
2. ``pauses`` pauses after the prompt (``pauses_after_prompt``), or, the control,
   ``filler`` ordinary tokens there (``FILLER_TOKEN``: the task's noise or field token, "."
   in passkey text), as many extra positions with nothing to learn about them;
3. ``backspace_rate``: mistakes drawn by ``backspace_errors``, each followed by
   ``<backspace>`` (``inject_errors``).

Evaluation examples get only what decoding would add after the prompt
(``eval_after_prompt``): ``eval_pauses`` pauses (default ``pauses``; the paper's control is
pauses at inference only, ``pauses = 0``), or the same filler.  Memory tokens
(``model.memory_tokens``) change the model, not the data.
"""

from __future__ import annotations

import torch

from longctx.data.backspace import inject_errors
from longctx.data.pause import insert_pauses, pauses_after_prompt
from longctx.data.synthetic import ADDITION_NOISE

MECHANISM_OFFSETS = {"pause": 0, "mem": 1, "backspace": 2}  # id = the task's vocabulary size + offset
# An ordinary token of each task that carries no information where it is inserted.
FILLER_TOKEN = {"induction": 0, "selective_copying": 0, "mqar": 0, "passkey": ord("."), "addition": ADDITION_NOISE}


def used_mechanisms(cfg) -> list[str]:
    """The mechanism tokens a task run (``TaskConfig``) uses, in ``MECHANISM_OFFSETS`` order."""
    used = {"pause": bool(cfg.pauses or cfg.pretrain_pauses or cfg.eval_pauses),
            "mem": bool(cfg.model.get("memory_tokens", 0)), "backspace": cfg.backspace_rate > 0}
    return [name for name in MECHANISM_OFFSETS if used[name]]


def mechanism_ids(cfg) -> dict[str, int]:
    """``{name: id}`` of the mechanism tokens the run uses (module docstring)."""
    return {name: cfg.vocab_size() + MECHANISM_OFFSETS[name] for name in used_mechanisms(cfg)}


def train_transform(cfg, inputs: torch.Tensor, targets: torch.Tensor, seed: int):
    """A training batch with the run's pauses, filler and mistakes (module docstring);
    ``seed`` draws the random places and mistakes."""
    ids = mechanism_ids(cfg)
    if cfg.pretrain_pauses:
        inputs, targets = insert_pauses(inputs, targets, ids["pause"], cfg.pretrain_pauses, seed=seed)
    if cfg.pauses:
        inputs, targets = pauses_after_prompt(inputs, targets, ids["pause"], cfg.pauses)
    if cfg.filler:
        inputs, targets = pauses_after_prompt(inputs, targets, FILLER_TOKEN[cfg.task], cfg.filler)
    if cfg.backspace_rate:
        inputs, targets = inject_errors(inputs, targets, ids["backspace"], rate=cfg.backspace_rate,
                                        vocab=cfg.vocab_size(), pad_id=FILLER_TOKEN[cfg.task],
                                        errors=cfg.backspace_errors, seed=seed + 1)
    return inputs, targets


def eval_after_prompt(cfg) -> tuple[int, int] | None:
    """``(token id, count)`` that evaluation inserts after each example's prompt, or None."""
    if cfg.filler:
        return FILLER_TOKEN[cfg.task], cfg.filler
    count = cfg.pauses if cfg.eval_pauses is None else cfg.eval_pauses
    return (mechanism_ids(cfg)["pause"], count) if count else None
