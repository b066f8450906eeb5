"""Durable, atomic small-file writes: readers see the old content or the new, never a mix."""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_writer(path: Path, mode: int = 0o600, *, prefix: str | None = None) -> Iterator[BinaryIO]:
    """A file to write `path`'s new content to: a temp file in the same directory (named
    `prefix` + random, default `.{name}.`), fsync'd and renamed over `path` when the block
    ends, then the directory fsync'd, so the rename itself survives a crash; removed if the
    block raises. Owner-only by default."""
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` as `atomic_writer` does."""
    with atomic_writer(path, mode) as f:
        f.write(data)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename in it); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
