import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Prepared datasets go to a per-session temp dir, never the user's cache."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_corpus(tmp_path):
    """A small corpus of Python-like documents, enough for a few training steps."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(12):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (root / f"mod{i}.py").write_text(body)
    return root
