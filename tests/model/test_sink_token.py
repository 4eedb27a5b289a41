"""The learned sink token (StreamingLLM §3.3): prepended to every fresh sequence, so a
sink cache with one sink streams exactly like re-encoding the window from scratch."""

import pytest
import torch

from longctx.model import LanguageModel, ModelConfig
from longctx.model.hf import HFCheckpointError, to_hf


def model_of(layers=("attention", "attention"), **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_heads=4, layers=list(layers), sink_token=True,
                      ssm_head_dim=16, **kw)
    return LanguageModel(cfg).eval()


@pytest.mark.parametrize("layers", [("attention", "attention"), ("mamba", "attention"), ("mamba2",)])
def test_decoding_and_chunked_prefill_equal_the_full_pass(layers):
    model = model_of(layers)
    ids = torch.randint(0, 50, (2, 23))
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(2)
        steps = torch.cat([model(ids[:, :9], state), *(model(ids[:, t : t + 1], state) for t in range(9, 23))], dim=1)
    assert full.shape == (2, 23, 50)
    torch.testing.assert_close(steps, full, atol=2e-5, rtol=1e-4)
    assert state.seq_len == 24  # the sink counts among the tokens seen


def test_the_sink_changes_the_output_and_learns():
    model = model_of()
    ids = torch.randint(0, 50, (1, 12))
    plain = LanguageModel(ModelConfig(**{**model.config.to_dict(), "sink_token": False})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "sink"})
    with torch.no_grad():
        assert not torch.allclose(model(ids), plain(ids))
    model(ids).logsumexp(-1).sum().backward()
    assert model.sink.grad is not None and model.sink.grad.abs().sum() > 0


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_one_sink_streams_like_reencoding_the_window(pos):
    # One layer: its cached keys depend on the token alone (deeper layers' keys remember
    # the longer context they were computed in, which re-encoding does not see).
    model = model_of(("attention",), pos=pos)
    window = 6
    ids = torch.randint(0, 50, (1, 30))
    state = model.init_state(1, cache="sinks", sinks=1, window=window)
    with torch.no_grad():
        for t in range(30):
            logits = model(ids[:, t : t + 1], state)[0, -1]
            # The cache keeps the sink and the last `window` tokens at positions 0..window:
            # a fresh pass over those tokens (the sink prepended again) computes the same.
            again = model(ids[:, max(0, t - window + 1) : t + 1])[0, -1]
            torch.testing.assert_close(logits, again, atol=2e-5, rtol=1e-4)


def test_exports_and_sequence_parallelism_refuse_it(tmp_path):
    from longctx.distributed import apply_sequence_parallel

    model = model_of()
    with pytest.raises(HFCheckpointError, match="sink token"):
        to_hf(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="sink_token"):
        apply_sequence_parallel(model)
