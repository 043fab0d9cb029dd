"""A training run's out_dir: made (or found unusable, with a one-line reason), held by one trainer at a
time, and cleaned of the temporary files of a trainer killed while writing.

The lock is out_dir/train.lock, locked with fcntl.flock and holding the owner's pid (for the message
a second trainer gets). The kernel drops the lock when its process dies, however it dies, so a lock
file left behind by a dead trainer is simply taken over. Where fcntl is missing (Windows), runs are
not locked.
"""
from __future__ import annotations

import os

from ._io import remove_stale_tmp_files
from .checkpoint import BEST_NAME, CKPT_NAME

LOCK_NAME = "train.lock"
# the files a run writes with atomic_write, whose temporary files a killed run can leave behind
RUN_FILES = (CKPT_NAME, BEST_NAME, "loss.png", "metrics.jsonl", "peak_flops.json")


class RunDirError(RuntimeError):
    """out_dir cannot be used: not a folder, not writable, or in use by another trainer."""


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def make_run_dir(out_dir: str) -> str:
    """Create out_dir if needed and check that files can be created in it; RunDirError if not."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunDirError(f"out_dir {out_dir} is a file, not a folder; choose another --out_dir")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, read-only file system
        raise RunDirError(f"cannot create out_dir {out_dir} ({_reason(e)}); choose another --out_dir") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"out_dir {out_dir} is not writable; choose another --out_dir")
    return out_dir


class RunDirLock:
    """Holds out_dir for one trainer: acquire() raises RunDirError where another live process holds it."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd = None

    def acquire(self) -> RunDirLock:
        try:
            import fcntl
        except ImportError:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise RunDirError(f"cannot create the lock file {self.path} ({_reason(e)}); "
                              f"choose another --out_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"out_dir {os.path.dirname(self.path)} is in use by another training run "
                              f"(pid {owner}); wait for it, stop it, or choose another --out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (removing it would race a new owner)
            self.fd = None


def open_run_dir(out_dir: str, log=lambda msg: None) -> RunDirLock:
    """Make out_dir, lock it, and remove what a killed trainer left half-written; returns the lock."""
    lock = RunDirLock(make_run_dir(out_dir)).acquire()
    try:
        for p in remove_stale_tmp_files(out_dir, RUN_FILES):
            log(f"removed {p}, left half-written by a run that was killed")
    except BaseException:
        lock.release()
        raise
    return lock
