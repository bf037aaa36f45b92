"""The one error type for data that cannot be read as configured (its own module: storage, manifests and
loaders all raise it, and none of them should import another just for the class), and how the messages about data
count what they name: a tiny set is where "1 images" or "1 classes" is read, and every such message imports this
module already."""

from __future__ import annotations


class DataError(ValueError):
    """Shards that cannot be read as configured; the message names the file or key."""


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 image', '2 images', '0 images'; `nouns` where adding an s is wrong ('class', 'classes')."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
