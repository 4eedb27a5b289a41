"""Pause transforms: where pauses go, and that their outputs count neither in the loss nor
in the answer."""

import pytest
import torch

from longctx.data.errors import DataError
from longctx.data.pause import insert_after, insert_pauses, pauses_after_prompt
from longctx.data.synthetic import IGNORE, passkey
from longctx.train.tasks.trainer import task_loss

P = 99  # the pause id in these tests
N = IGNORE


def test_insert_after_moves_the_target_to_the_last_pause():
    inputs, targets = torch.tensor([[10, 11, 12, 13]]), torch.tensor([[11, 12, 13, 14]])
    new_inputs, new_targets = insert_after(inputs, targets, torch.tensor([[1, 3, 1]]), P)
    assert new_inputs.tolist() == [[10, 11, P, P, 12, 13, P]]
    assert new_targets.tolist() == [[11, N, N, 12, 13, N, 14]]


def _next_token_batch(batch=3, time=40, seed=0):
    tokens = torch.randint(0, 50, (batch, time + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def test_random_pauses_keep_next_token_targets():
    inputs, targets = _next_token_batch()
    new_inputs, new_targets = insert_pauses(inputs, targets, P, 8, seed=3)
    assert new_inputs.shape == (3, 48)
    is_pause = new_inputs == P
    assert (is_pause.sum(1) == 8).all()
    for b in range(3):
        assert new_inputs[b][~is_pause[b]].tolist() == inputs[b].tolist()
        # Every asked target is the next real token; a position followed by a pause asks nothing.
        asked = (new_targets[b] != IGNORE).nonzero().flatten().tolist()
        assert new_targets[b][asked].tolist() == targets[b].tolist()
        for t in asked:
            assert t == len(new_inputs[b]) - 1 or not is_pause[b, t + 1]
    assert insert_pauses(inputs, targets, P, 8, seed=3)[0].equal(new_inputs)  # seeded
    assert not insert_pauses(inputs, targets, P, 8, seed=4)[0].equal(new_inputs)


def test_pause_outputs_are_excluded_from_the_loss():
    inputs, targets = _next_token_batch()
    new_inputs, new_targets = insert_pauses(inputs, targets, P, 10, seed=1)
    logits = torch.randn(*new_inputs.shape, 100, generator=torch.Generator().manual_seed(2))
    loss, correct = task_loss(logits, new_targets)
    # Outputs whose next token is a pause, and at pauses followed by another pause, are free:
    # making them anything changes neither the loss nor the correct count.
    free = torch.zeros_like(new_inputs, dtype=torch.bool)
    free[:, :-1] = new_inputs[:, 1:] == P
    assert free.any()
    changed = logits.clone()
    changed[free] = torch.randn(int(free.sum()), 100) * 50
    changed[free, P] = 1e4  # even predicting the pause with certainty
    loss2, correct2 = task_loss(changed, new_targets)
    assert torch.equal(loss, loss2) and int(correct) == int(correct2)
    # The real next token's positions do count.
    changed[new_targets != IGNORE] += 1.0 * torch.randn(100)
    assert not torch.equal(task_loss(changed, new_targets)[0], loss)


def test_pauses_after_prompt_put_the_answer_after_the_last_pause():
    inputs, targets = passkey(2, 128, digits=5, seed=0)
    new_inputs, new_targets = pauses_after_prompt(inputs, targets, P, 4)
    first = 128 - 5  # the input "is " whose target is the first digit
    assert new_inputs.shape == (2, 132)
    assert new_inputs[:, :first + 1].equal(inputs[:, :first + 1])
    assert (new_inputs[:, first + 1 : first + 5] == P).all()
    assert new_inputs[:, first + 5 :].equal(inputs[:, first + 1 :])
    # The answer is read from the positions from the last pause on: the 5 digits, in order.
    asked = (new_targets != IGNORE).nonzero()[:, 1].view(2, 5)
    assert (asked == torch.arange(first + 4, first + 9)).all()
    assert new_targets[:, first + 4 :].equal(targets[:, first:])
    assert (new_targets[:, : first + 4] == IGNORE).all()
    assert pauses_after_prompt(inputs, targets, P, 0)[0].equal(inputs)


def test_errors():
    inputs, targets = _next_token_batch(1, 5)
    with pytest.raises(DataError, match="number of pauses"):
        insert_pauses(inputs, targets, P, -1)
    with pytest.raises(DataError, match="needs an asked position"):
        pauses_after_prompt(inputs, torch.full_like(targets, IGNORE), P, 2)
    with pytest.raises(DataError, match="must be in 0..4"):
        insert_after(inputs, targets, torch.tensor([[5]]), P)
