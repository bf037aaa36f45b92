"""Writes that an interrupted process cannot leave half-done: write a temporary sibling, flush it to the
disk (fsync), then rename it over the target (a rename within one folder is atomic on POSIX file systems)
and flush the folder, so that after a crash or power loss the file is either the old one or the new one."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# What file systems answer when they do not fsync folders at all (some FUSE and network mounts, older CIFS): their
# renames are then their own business. Anything else (EIO, ENOSPC, EDQUOT: NFS and Lustre report a full disk or
# quota only here) means data that did not reach the disk.
FOLDER_FSYNC_REFUSED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.ENOSYS})


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents to the disk (a folder: its entries, i.e. renames into it). A file's
    failure is raised: a checkpoint sealed after a swallowed EIO or quota error would be trusted, and older good
    ones rotated away for it. A folder's is ignored only where the file system refuses folder fsync as such."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (exc.errno in FOLDER_FSYNC_REFUSED and stat.S_ISDIR(os.fstat(fd).st_mode)):
            raise
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is flushed and replaces `path`, on failure it is removed.
    The temporary name keeps the suffix, so libraries that pick a format from it (PNG) still can."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        with suppress(OSError):  # a file system without modes (some CIFS/FUSE mounts) keeps its own
            os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600: others of a team could not read an export
        fsync_path(tmp)
        tmp.replace(path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask sets it to read it)."""
    with suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
