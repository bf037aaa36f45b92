"""The one error type for data that cannot be read as configured (its own module: storage, manifests and
loaders all raise it, and none of them should import another just for the class)."""

from __future__ import annotations


class DataError(ValueError):
    """Shards that cannot be read as configured; the message names the file or key."""
