"""Error injection for backspace training: the layout, the loss mask (no loss on the
wrong token, loss on the backspace after it) and the error rules."""

import pytest
import torch

from longctx.data.backspace import inject_errors
from longctx.data.errors import DataError
from longctx.data.synthetic import IGNORE, mqar

B, PAD, N = 20, 0, IGNORE  # backspace and pad ids of these tests


def test_layout_and_loss_mask_at_rate_one():
    inputs, targets = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])
    new_inputs, new_targets = inject_errors(inputs, targets, B, rate=1.0, vocab=10, pad_id=PAD, seed=0)
    w = new_inputs[0, 1::3].tolist()
    assert new_inputs.tolist() == [[1, w[0], B, 2, w[1], B, 3, w[2], B]]
    assert new_targets.tolist() == [[2, B, 2, 3, B, 3, 4, B, 4]]
    assert all(wrong != right for wrong, right in zip(w, [2, 3, 4]))


def _apply_backspaces(ids):
    out = []
    for i in ids:
        if i == B:
            out.pop()
        else:
            out.append(i)
    return out


@pytest.mark.parametrize("errors", ["uniform", "context"])
def test_random_mistakes(errors):
    tokens = torch.randint(1, 16, (4, 65), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    new_inputs, new_targets = inject_errors(inputs, targets, B, rate=0.2, vocab=16, pad_id=PAD, errors=errors,
                                            seed=1)
    assert new_inputs.shape[1] > 64
    total = in_context = 0
    for b in range(4):
        row, row_targets = new_inputs[b].tolist(), new_targets[b].tolist()
        while row[-1] == PAD:  # padding: pad inputs, no targets
            row.pop()
            assert row_targets.pop() == IGNORE
        assert _apply_backspaces(row) == inputs[b].tolist()
        for p in [i for i, token in enumerate(row) if token == B]:
            wrong, correct = row[p - 1], row_targets[p - 2]
            total += 1
            assert wrong != correct and 0 <= wrong < 16
            assert row_targets[p - 1] == B  # the loss that teaches the backspace
            assert row_targets[p] == correct  # and the continuation after it
            assert row[p - 2] not in (B,) and correct == targets[b, len(_apply_backspaces(row[: p - 1])) - 1]
            in_context += wrong in row[: p - 1]
        # No position asks for a wrong token: every asked target is the real next token or <backspace>.
        asked = [t for t in row_targets if t != IGNORE]
        assert [t for t in asked if t != B] == _interleave_targets(targets[b].tolist(), row)
    assert 0.1 * 4 * 64 < total < 0.3 * 4 * 64
    if errors == "context":  # a token of the context so far, but where that was the right one
        assert in_context / total > 0.9


def _interleave_targets(targets, row):
    """The original targets, each mistake's target repeated once more (after its backspace)."""
    out, t = [], 0
    for i, token in enumerate(row):
        if token == B:
            out.append(out[-1])
        elif i + 1 < len(row) and row[i + 1] == B:
            continue  # the wrong token itself
        else:
            out.append(targets[t])
            t += 1
    return out


def test_only_asked_positions_get_mistakes():
    inputs, targets = mqar(3, 64, vocab=32, pairs=4, seed=0)
    new_inputs, _ = inject_errors(inputs, targets, 40, rate=1.0, vocab=32, pad_id=PAD, seed=0)
    assert (new_inputs == 40).sum() == (targets != IGNORE).sum() == 12
    assert new_inputs.shape == (3, 64 + 8)


def test_seeded_and_rate_zero():
    inputs, targets = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]])
    a = inject_errors(inputs, targets, B, rate=0.5, vocab=10, pad_id=PAD, seed=7)
    b = inject_errors(inputs, targets, B, rate=0.5, vocab=10, pad_id=PAD, seed=7)
    assert a[0].equal(b[0]) and a[1].equal(b[1])
    none = inject_errors(inputs, targets, B, rate=0.0, vocab=10, pad_id=PAD)
    assert none[0].equal(inputs) and none[1].equal(targets)


@pytest.mark.parametrize("options, match", [
    (dict(rate=1.5), "error rate must be in"),
    (dict(errors="model"), "unknown error rule 'model'"),
    (dict(vocab=1), "vocab of >= 2"),
])
def test_bad_options(options, match):
    inputs, targets = torch.tensor([[1, 2]]), torch.tensor([[2, 3]])
    with pytest.raises(DataError, match=match):
        inject_errors(inputs, targets, B, **{"rate": 0.1, "vocab": 10, "pad_id": PAD, **options})
