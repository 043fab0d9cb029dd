"""Writing files so that a crash or Ctrl-C never leaves a half-written one behind."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str | os.PathLike, write, durable: bool = True) -> None:
    """Call write(binary_file) on a temporary file beside `path`, then rename it over `path`.

    durable: also fsync the file and its folder, so the new content survives a power cut (checkpoints,
    datasets); plots and caches can skip that.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        try:  # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
