"""Checkpoint files: written atomically, loaded safely, with every random state needed to resume exactly.

A nanofast checkpoint (out_dir/ckpt.pt) is nanoGPT's dict plus a few entries:

    model, optimizer, model_args, iter_num, best_val_loss, config   as in nanoGPT
    rng            this process' random states: python, numpy, torch CPU, CUDA (if any) and the
                   data sampler's generator (see capture_rng_state)
    rng_per_rank   the same for every DDP rank (a list; rank 0 first)
    scaler         the float16 GradScaler's state (absent when it is not in use)
    meta           the character vocabulary (itos), so sampling needs no data folder
    format         "nanofast-checkpoint", version 1

Everything in it is a tensor or a plain Python value, so torch.load(path, weights_only=True) loads
it, and nanoGPT's train.py / sample.py load it too (model_args holds only nanoGPT's GPTConfig
fields).

What a run keeps in out_dir:
    ckpt.pt        the latest state the run saved: at each evaluation (always_save_checkpoint=True)
                   or at each evaluation that lowers the val loss (False), at the end (where
                   always_save_checkpoint is True or the run saved nothing else) and on Ctrl-C.
                   --init_from=resume continues from it.
    ckpt_best.pt   the state with the lowest val loss so far (its best_val_loss, which every later
                   checkpoint of the run repeats). Saving it costs nothing: it is a second name of
                   the ckpt.pt written at that evaluation (a hard link; a copy where there are none),
                   and a later ckpt.pt replaces only its own name.
A damaged file is recognised by the CRC-32 checksum that torch.save's zip format stores for each
entry (nanoGPT's checkpoints have them too); torch.load alone never checks them.
"""
from __future__ import annotations

import os
import random
import re
import zipfile

import numpy as np
import torch

from ._io import atomic_link, atomic_write

CKPT_NAME = "ckpt.pt"  # the latest state (resume continues from it)
BEST_NAME = "ckpt_best.pt"  # the state with the lowest val loss

FORMAT = "nanofast-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, or not a (nano)GPT checkpoint."""


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`.

    A crash or Ctrl-C while writing leaves the previous checkpoint untouched.
    """
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, map_location="cpu", weights_only=True) -> dict:
    """torch.load a checkpoint, with clear errors for a missing, empty, truncated, damaged or foreign
    file, and for one that refers to Python classes or functions (which could run code)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was cut off while being written")
    verify_checksums(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        if weights_only and "unsupported global" in text.lower():
            found = re.search(r"global:?\s+(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refused to load checkpoint {path}: it refers to a Python class or function{what}, which a "
                f"checkpoint of tensors and plain values does not, and loading it could run code") from None
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {first})") from None
    validate_checkpoint(ckpt, path)
    return ckpt


def verify_checksums(path) -> None:
    """CheckpointError where an entry of a zip-format checkpoint (torch.save's format since torch 1.6)
    fails the CRC-32 checksum stored beside it. Files in torch's older format have none to check."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        return  # torch.load tells a truncated or foreign file apart
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: its zip structure cannot be read "
                              f"({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: its entry {bad} fails its CRC-32 checksum "
                              f"(the bytes changed after it was written); resume from another copy")


def keep_as_best(path, best_path) -> None:
    """Make `best_path` hold the checkpoint just written to `path` (see the module docstring)."""
    atomic_link(path, best_path)


def validate_checkpoint(ckpt, path="checkpoint") -> None:
    """Raise CheckpointError unless `ckpt` looks like a nanoGPT or nanofast checkpoint."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a nanoGPT/nanofast checkpoint: it holds a {type(ckpt).__name__}, "
                              f"not a dict with 'model' and 'model_args'")
    missing = [k for k in ("model", "model_args") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a nanoGPT/nanofast checkpoint: it has no "
                              f"{' or '.join(repr(m) for m in missing)} entry (its keys: {sorted(map(str, ckpt))[:10]})")
    if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path} is not a nanoGPT/nanofast checkpoint: 'model_args' and 'model' must be dicts")
    need = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in ckpt["model_args"]]
    if need:
        raise CheckpointError(f"{path}: model_args lacks {need}")
    if ckpt.get("format", FORMAT) == FORMAT and ckpt.get("version", VERSION) > VERSION:
        raise CheckpointError(f"{path} was written by a newer nanofast (checkpoint version {ckpt['version']}, "
                              f"this one reads up to {VERSION})")


# ----------------------------------------------------------------------------------------------
# random states, as tensors and plain values (weights_only-loadable)

def capture_rng_state(sampler=None, raw=False) -> dict:
    """This process' random states: python, numpy, torch CPU, CUDA (where initialised), sampler.

    raw=True keeps python's and numpy's states as they come (cheap enough to take every iteration);
    rng_state_for_checkpoint turns such a snapshot into tensors and plain values.
    """
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "cuda": None,
        "sampler": sampler.state_dict() if sampler is not None else None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state if raw else rng_state_for_checkpoint(state)


def rng_state_for_checkpoint(state: dict) -> dict:
    """A capture_rng_state(raw=True) snapshot as tensors and plain values (weights_only-loadable)."""
    py = state["python"]
    if isinstance(py, tuple):
        py_version, py_state, py_gauss = py
        py = {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64, device="cpu"),
              "gauss": py_gauss}
    npst = state["numpy"]
    if isinstance(npst, tuple):
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = npst
        npst = {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)}
    return {**state, "python": py, "numpy": npst}


def restore_rng_state(state: dict, sampler=None) -> list[str]:
    """Put back what capture_rng_state recorded; returns notes on what could not be restored."""
    notes = []
    py = state.get("python")
    if py is not None:
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state.get("numpy")
    if npst is not None:
        np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                             npst["has_gauss"], npst["cached_gaussian"]))
    if state.get("torch_cpu") is not None:
        torch.set_rng_state(state["torch_cpu"].cpu())
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            notes.append("the checkpoint's CUDA random states were not restored (different GPUs here)")
    if sampler is not None:
        if state.get("sampler") is not None:
            sampler.load_state_dict(state["sampler"])
        else:
            notes.append("the checkpoint has no data sampler state; batches restart from the seed")
    return notes
