"""Finding the text files of a corpus and reading them as documents.

A corpus is named by a file, a folder, a glob pattern, or nothing: the
running interpreter's standard library, which every machine with Python has.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import warnings
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

    None is the standard library; a file is itself, and must be text (UTF-8);
    a folder is every text file under it (hidden entries skipped, and binary
    files, with a warning that counts them); a string with `*`, `?` or `[` that
    is not an existing path is a glob (`**` recurses) whose text files are taken.
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
        matches = [p for p in map(Path, glob.glob(os.path.expanduser(spec), recursive=True)) if p.is_file()]
        files = _keep_text(matches, f"glob '{spec}'")
        if not files:
            raise DataError(f"glob '{spec}' matched no text files; check the pattern")
        where = f"glob '{spec}'"
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            if not _is_text(path):
                raise DataError(f"'{spec}' is not a text file (it holds binary data or is not UTF-8); pass text "
                                "files, a folder or a glob")
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
        files.extend(Path(dirpath, name) for name in filenames if not name.startswith("."))
    return _keep_text(sorted(p for p in files if p.is_file()), f"folder '{root}'")


def _keep_text(paths: list[Path], where: str) -> list[Path]:
    """The text files of ``paths``; a warning names how many others were skipped."""
    text = [p for p in paths if _is_text(p)]
    skipped = [p.name for p in paths if p not in set(text)]
    if skipped:
        examples = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        warnings.warn(f"{where}: skipped {len(skipped)} file(s) that are not text ({examples})", stacklevel=3)
    return sorted(text)


def _is_text(path: Path) -> bool:
    """Whether the file's first 8 KiB read as UTF-8 text: binary files almost always hold a
    NUL byte early on, and other encodings or random bytes fail to decode (a character cut
    at the end of the sample is allowed)."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\0" in head:
        return False
    text = head.decode("utf-8", errors="replace")
    return text.count("\ufffd") <= 1 + len(text) // 1000


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
