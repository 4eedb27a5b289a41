"""Corpus resolution: files, folders, globs, the standard-library default, errors."""

import pytest

from longctx.data import DataError, default_corpus_files, read_documents, resolve_corpus


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub" / "b.py").write_text("beta = 1\n")
    (tmp_path / "sub" / "c.txt").write_bytes(b"bad \xff byte\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    (tmp_path / ".git" / "HEAD").write_text("ref: main\n")
    return tmp_path


def test_file(corpus):
    assert resolve_corpus(corpus / "a.txt") == [corpus / "a.txt"]
    assert resolve_corpus(str(corpus / "a.txt")) == [corpus / "a.txt"]


def test_folder_skips_binary_hidden_and_empty(corpus):
    with pytest.warns(UserWarning, match="skipped 1 file\\(s\\) that are not text \\(blob.bin\\)"):
        files = resolve_corpus(corpus)
    assert files == [corpus / "a.txt", corpus / "sub" / "b.py", corpus / "sub" / "c.txt"]
    docs = dict(read_documents(files))
    assert docs == {"a.txt": "alpha\n", "sub/b.py": "beta = 1\n", "sub/c.txt": "bad \ufffd byte\n"}


def test_glob(corpus):
    assert resolve_corpus(str(corpus / "**" / "*.txt")) == [corpus / "a.txt", corpus / "sub" / "c.txt"]
    assert resolve_corpus(str(corpus / "sub" / "?.py")) == [corpus / "sub" / "b.py"]
    with pytest.raises(DataError, match="matched no text files"):
        resolve_corpus(str(corpus / "*.nothing"))


def test_binary_files_given_by_name_are_refused(tmp_path):
    """Random bytes (no NUL byte in this sample) and a PNG are not text, whatever their name."""
    import random

    noise = bytes(random.Random(0).choice(range(1, 256)) for _ in range(20000))
    (tmp_path / "noise.txt").write_bytes(noise)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
    for name in ("noise.txt", "image.png"):
        with pytest.raises(DataError, match=f"'{tmp_path / name}' is not a text file"):
            resolve_corpus(tmp_path / name)


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass a file, a folder or a glob"):
        resolve_corpus(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no text files"):
        resolve_corpus(tmp_path / "empty_dir")
    (tmp_path / "empty_dir" / "e.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        resolve_corpus(tmp_path / "empty_dir")


def test_default_corpus_is_stdlib_python():
    files = default_corpus_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert files == sorted(files)
    assert not any("site-packages" in f.parts for f in files)
