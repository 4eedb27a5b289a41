"""model.special_tokens: validated, kept by a run's save/load beside the tokenizer, and the
reason to_hf refuses a model."""

import pytest

from longctx.data import ByteTokenizer, save_tokenizer
from longctx.model import LanguageModel, ModelConfig
from longctx.model.config import ConfigError
from longctx.model.hf import HFCheckpointError, to_hf

TOKENS = {"pause": 259, "backspace": 261}
TINY = dict(vocab_size=264, d_model=32, n_heads=2, layers=["attention"], mlp_hidden=64)


def test_run_keeps_special_tokens(tmp_path):
    from longctx.train.checkpoint import save_checkpoint, write_json_atomic
    from longctx.train.config import RunConfig
    from longctx.train.runs import load_run

    model = LanguageModel(ModelConfig(**TINY, special_tokens=TOKENS))
    write_json_atomic(tmp_path / "config.json", RunConfig(model=model.config).to_dict())
    save_tokenizer(ByteTokenizer(), tmp_path)
    save_checkpoint(tmp_path, 0, model, None, {})
    cfg, loaded, tokenizer, _ = load_run(tmp_path)
    assert cfg.model.special_tokens == loaded.config.special_tokens == TOKENS
    assert (tokenizer.pause_id, tokenizer.backspace_id) == (TOKENS["pause"], TOKENS["backspace"])


@pytest.mark.parametrize("tokens, match", [
    ({"think": 1}, "names among pause, mem, backspace"),
    ({"pause": 264}, "special_tokens.pause must be a token id in 0..263"),
    ({"pause": True}, "special_tokens.pause must be a token id"),
    ({"pause": 5, "mem": 5}, "the same id"),
])
def test_bad_special_tokens(tokens, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**TINY, special_tokens=tokens)


def test_to_hf_refuses_a_model_with_mechanism_tokens(tmp_path):
    model = LanguageModel(ModelConfig(**TINY, special_tokens=TOKENS))
    with pytest.raises(HFCheckpointError, match=r"trained with <pause> \(id 259\), <backspace> \(id 261\).*no "
                                                r"Hugging Face architecture represents them"):
        to_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    to_hf(LanguageModel(ModelConfig(**TINY)), tmp_path / "plain")  # the same model without them exports
    assert (tmp_path / "plain" / "config.json").is_file()
