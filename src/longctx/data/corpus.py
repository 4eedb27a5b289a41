"""Finding the text files of a corpus and reading them as documents.

A corpus is named by a file, a folder, a glob pattern, or nothing: the
running interpreter's standard library, which every machine with Python has.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import DataError

_GLOB_CHARS = set("*?[")
_SNIFF_BYTES = 8192
_THIRD_PARTY_DIRS = {"site-packages", "dist-packages"}


def default_corpus_files() -> list[Path]:
    """The standard library's `.py` files (third-party packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _THIRD_PARTY_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def resolve_corpus(spec: str | Path | None) -> list[Path]:
    """The absolute paths of the non-empty files named by `spec`, sorted.

    None is the standard library; a file is itself; a folder is every text
    file under it (hidden entries and files with a NUL byte in their first
    8 KiB skipped); a string with `*`, `?` or `[` that is not an existing
    path is a glob (`**` recurses) whose text files are taken.
    """
    if spec is None:
        files = default_corpus_files()
        if not files:
            raise DataError(
                f"no .py files in the standard library at '{sysconfig.get_paths()['stdlib']}'; "
                "pass a data path instead"
            )
        where = "the Python standard library"
    elif isinstance(spec, str) and _GLOB_CHARS & set(spec) and not Path(spec).expanduser().exists():
        matches = glob.glob(os.path.expanduser(spec), recursive=True)
        files = sorted(p for p in map(Path, matches) if p.is_file() and _is_text(p))
        if not files:
            raise DataError(f"glob '{spec}' matched no text files; check the pattern")
        where = f"glob '{spec}'"
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = _text_files_under(path)
            if not files:
                raise DataError(f"folder '{spec}' contains no text files; pass a folder with data")
        else:
            raise DataError(f"data path '{spec}' does not exist; pass a file, a folder or a glob")
        where = f"'{spec}'"
    files = [p.absolute() for p in files if p.stat().st_size > 0]
    if not files:
        raise DataError(f"all files of {where} are empty; pass data with some text in it")
    return files


def _text_files_under(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file() and _is_text(path):
                files.append(path)
    return sorted(files)


def _is_text(path: Path) -> bool:
    """Binary files almost always hold a NUL byte early on; text never does."""
    with open(path, "rb") as f:
        return b"\0" not in f.read(_SNIFF_BYTES)


def document_names(files: Sequence[Path]) -> list[str]:
    """Stable names for `files`: their paths relative to the folder they share.

    Names do not depend on where the corpus lives, so a document lands in
    the same train/val split on every machine.
    """
    if not files:
        return []
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files])
    return [Path(os.path.relpath(os.path.abspath(p), root)).as_posix() for p in files]


def read_documents(files: Sequence[Path]) -> Iterator[tuple[str, str]]:
    """Yield (name, text) per file; undecodable bytes become U+FFFD."""
    for name, path in zip(document_names(files), files):
        # Bytes, not read_text: newlines stay as written, so counts match the file.
        yield name, Path(path).read_bytes().decode("utf-8", errors="replace")
