"""A sequence-parallel model: one training step on P ranks equals one process (loss, gradients)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.distributed.layout import shard_sequence
from longctx.distributed.parallelize import all_reduce_gradients, apply_sequence_parallel
from longctx.model import LanguageModel, ModelConfig
from tests.distributed.harness import run_ranks

CONFIG = dict(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, mlp_hidden=48, ssm_state=8, ssm_head_dim=16,
              ssm_chunk=4, dilated_segments=[4, 8, 16, 32], dilated_rates=[1, 2, 4, 8])
LAYERS = {"contiguous": ["mamba", "attention", "mamba2", "dilated"], "zigzag": ["mamba", "attention", "mamba2"]}


def _model(layout, pos="rope"):
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(layers=LAYERS[layout], pos=pos, max_seq_len=32 if pos == "learned" else None,
                                     **CONFIG))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2, 33), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _step(model, x, y, total_tokens):
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") / total_tokens
    loss.backward()
    return loss


def _rank(rank, world, layout, pos):
    model = apply_sequence_parallel(_model(layout, pos), layout=layout)
    x, y = _batch()
    loss = _step(model, shard_sequence(x, layout=layout), shard_sequence(y, layout=layout), y.numel())
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    all_reduce_gradients(model)
    return float(total), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("world,layout,pos", [(2, "contiguous", "rope"), (4, "contiguous", "learned"),
                                              (2, "zigzag", "rope")])
def test_training_step_equals_one_process(world, layout, pos):
    model = _model(layout, pos)
    x, y = _batch()
    loss = float(_step(model, x, y, y.numel()).detach())
    for rank_loss, grads in run_ranks(_rank, world, layout, pos):
        assert rank_loss == pytest.approx(loss, rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("overrides,match", [
    (dict(pos="alibi"), "supports pos = rope, learned or none; ALiBi is not available"),
    (dict(attn_window=8, layers=["mamba", "attention"]), "cannot apply model.attn_window"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}),
     "dynamic RoPE scaling depends on the whole sequence's length"),
])
def test_what_cannot_run_split_is_refused_and_the_model_left_unchanged(tmp_path, overrides, match):
    """Ring attention takes no bias and attends to every earlier token, and a shard does not
    know the sequence's length, so ALiBi (the README: "ALiBi is not supported split"),
    sliding windows and dynamic RoPE scaling are refused before any seam is replaced.  A
    group of one process is enough to ask."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(**{**CONFIG, "layers": LAYERS["contiguous"], **overrides}))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=match):
            apply_sequence_parallel(model)
    finally:
        dist.destroy_process_group()
    assert not {"positions", "sequence_parallel"} & vars(model).keys()
    assert not any({"attend", "positions", "conv", "scan"} & vars(block.mixer).keys() for block in model.blocks)
