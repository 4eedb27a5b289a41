"""Model configuration and the language model."""

from longctx.model.config import ConfigError, ModelConfig
from longctx.model.lm import LanguageModel

__all__ = ["ConfigError", "LanguageModel", "ModelConfig"]
