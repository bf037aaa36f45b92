"""Writes that an interrupted process cannot leave half-done: write a temporary sibling, then rename
it over the target (a rename within one folder is atomic on POSIX file systems)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on failure it is removed.
    The temporary name keeps the suffix, so libraries that pick a format from it (PNG) still can."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
