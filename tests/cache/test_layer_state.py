"""Every per-layer state implements one interface: seq_len, reset, nbytes, state_dict round trip, fork."""

import pytest
import torch

from longctx.cache import KVCache, LayerState, SinkKVCache, SSMState
from longctx.model import LanguageModel, ModelConfig

SMALL = dict(vocab_size=40, d_model=32, n_heads=2, mlp_hidden=0, ssm_state=8, ssm_head_dim=16)
KINDS = {
    "dense": (["attention"], {}, {}, KVCache),
    "sinks": (["attention"], {}, dict(cache="sinks", sinks=2, window=5), SinkKVCache),
    "mamba": (["mamba"], {}, {}, SSMState),
    "mamba2": (["mamba2"], {}, {}, SSMState),
    "dilated": (["dilated"], dict(dilated_segments=[4, 8], dilated_rates=[1, 2]), {}, KVCache),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_layer_states_share_one_interface(kind):
    layers, config, cache, cls = KINDS[kind]
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=layers, **{**SMALL, **config})).eval()
    state = model.init_state(2, **cache)
    layer = state.layers[0]
    assert isinstance(layer, cls) and isinstance(layer, LayerState)
    assert layer.seq_len == 0 and layer.nbytes == 0 and layer.state_dict() == {}
    with torch.no_grad():
        model(torch.randint(0, 40, (2, 7)), state)
        for _ in range(3):
            model(torch.randint(0, 40, (2, 1)), state)
    assert layer.seq_len == 10
    # nbytes counts the storage behind the state's tensors once each.
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in layer.tensors()}
    assert layer.nbytes == sum(held.values()) > 0
    assert state.nbytes >= layer.nbytes

    restored = model.init_state(2, **cache).layers[0]
    restored.load_state_dict(layer.state_dict())
    fork = layer.fork()
    for copy in (restored, fork):
        assert type(copy) is cls and copy.seq_len == 10
        saved, again = layer.state_dict(), copy.state_dict()
        assert saved.keys() == again.keys()
        for name in saved:
            torch.testing.assert_close(again[name], saved[name], rtol=0, atol=0)

    layer.reset()
    assert layer.seq_len == 0 and layer.state_dict() == {} and layer.nbytes == 0
    assert fork.seq_len == 10  # the fork kept its own copy
