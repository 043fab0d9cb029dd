"""Files a run reads and writes, handled safely: atomic writes (a crash or Ctrl-C never leaves a
half-written file behind) and pickles that can hold plain values only (a pickle can run code)."""
from __future__ import annotations

import os
import pickle
import tempfile

TMP_SUFFIX = ".tmp"  # atomic_write's temporary files are named <file name>.<random>.tmp


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write, durable: bool = True) -> None:
    """Call write(binary_file) on a temporary file beside `path`, then rename it over `path`.

    The file gets the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600.
    durable: also fsync the file and its folder, so the new content survives a power cut (checkpoints,
    datasets); plots and caches can skip that.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        _discard(tmp)
        raise
    _rename(tmp, path)
    if durable:
        try:  # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def remove_stale_tmp_files(folder: str | os.PathLike, names) -> list[str]:
    """Remove the temporary files atomic_write left in `folder` for the files `names` when its process
    was killed mid-write (kill -9, a power cut). Only call this while no other process can be writing
    those files (e.g. holding the folder's lock). Returns the paths removed."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    prefixes = tuple(n + "." for n in names)
    for entry in entries:
        if entry.startswith(prefixes) and entry.endswith(TMP_SUFFIX):
            p = os.path.join(folder, entry)
            try:
                if os.path.isfile(p) and not os.path.islink(p):
                    os.unlink(p)
                    removed.append(p)
            except OSError:
                pass
    return removed


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that refers to a class or function: loading it could run code."""


# the constructors of plain values that older pickle protocols name (protocols 4 and 5 have opcodes)
_PLAIN = {(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset", "bytearray", "complex")}
_PLAIN |= {("_codecs", "encode"), ("collections", "OrderedDict")}


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, sets, strings, bytes, numbers, booleans and None; refuses every
    other reference to a class or function (the way a pickle runs code)."""

    def find_class(self, module, name):
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        raise UnsafePickleError(f"it refers to {module}.{name}, and a pickle that refers to classes or functions "
                                f"can run code when loaded")


def load_plain_pickle(path: str | os.PathLike):
    """The content of a pickle that holds plain values only (as nanoGPT's meta.pkl does: dicts of
    str and int). UnsafePickleError for anything else; other pickle errors as pickle raises them."""
    with open(path, "rb") as f:
        return _PlainUnpickler(f).load()


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` a second name of the file `src` (a hard link, so no bytes are copied), replacing
    `dst` atomically; where the file system has no hard links, an atomic copy. A later atomic_write
    of `src` renames a new file over it, so `dst` keeps the old content."""
    src, dst = os.fspath(src), os.fspath(dst)
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(folder, f"{os.path.basename(dst)}.{os.urandom(6).hex()}{TMP_SUFFIX}")
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        def copy(f):
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f)
        atomic_write(dst, copy)
        return
    _rename(tmp, dst)


def _discard(tmp):
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _rename(tmp, path):
    """os.replace, removing `tmp` where it fails (or is interrupted)."""
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
