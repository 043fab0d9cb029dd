"""Training metrics: this device's measured matmul peak (for MFU), a JSONL log, and a loss plot.

- peak_flops(device, dtype): the FLOP/s a short matmul probe reaches on this device at the training
  dtype. MFU is reported relative to it, not to an A100's 312 TFLOP/s. The result is cached in
  peak_flops.json under ~/.cache/nanofast (or $NANOFAST_CACHE_DIR, $XDG_CACHE_HOME/nanofast; if that
  is not writable, the fallback folder given, e.g. out_dir), keyed by device name (for a CPU also its
  vendor, family, model and stepping: a virtual machine may name different processors alike), dtype,
  thread count and torch version; refresh=True measures it again (nanofast-train does, once, when a
  step outpaces the cached value).
- MetricsLog: appends one JSON object per line to out_dir/metrics.jsonl.
- plot_losses: out_dir/loss.png, train and val loss against iterations (matplotlib, Agg canvas;
  pyplot's global state is left alone).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ._io import atomic_write
from .data import cache_root

PEAK_CACHE_NAME = "peak_flops.json"


# ----------------------------------------------------------------------------------------------
# the device's matmul peak

def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda:" + torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                name = cpu_identity(f.read())
        except OSError:
            name = ""
        return f"cpu:{name or platform.processor() or platform.machine()}:threads={torch.get_num_threads()}"
    return device.type


# /proc/cpuinfo's fields that tell processors apart: x86's, then Arm's (which often has no model name)
_CPU_ID_FIELDS = ("vendor_id", "cpu family", "model", "stepping", "CPU implementer", "CPU architecture",
                  "CPU variant", "CPU part", "CPU revision")


def cpu_identity(cpuinfo):
    """The first processor's model name, and its vendor, family, model and stepping (or Arm's
    implementer, part and revision) where /proc/cpuinfo gives them: virtual machines often show one
    generic name, "AMD EPYC", for every generation."""
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor only
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    ids = " ".join(fields[k] for k in _CPU_ID_FIELDS if fields.get(k))
    return f"{name} ({ids})".strip() if ids else name


def synchronize(device) -> None:
    """Wait for the work queued on `device` (a GPU's kernels run asynchronously)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _nanofast_gemm(device, dtype):
    """nanofast's GEMM (float32, or bfloat16 on AVX512-BF16) where a CPU run uses it for the probe's
    1024^3 product, else None."""
    from .ops import cpu
    return cpu.mm if torch.device(device).type == "cpu" and cpu.uses_gemm(1024, 1024, 1024, dtype) else None


def measure_matmul_flops(device, dtype=torch.float32, budget_s: float = 0.5) -> float:
    """Best FLOP/s of square matmuls on `device` in `dtype` within about `budget_s` seconds, with
    torch's matmul or, where the run uses it, nanofast's GEMM. The operands come from a generator of
    their own, so a run's random numbers do not depend on whether the peak was cached."""
    device = torch.device(device)
    matmul = _nanofast_gemm(device, dtype) or torch.mm
    n = 1024 if device.type == "cpu" else 4096
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device="cpu").to(device=device, dtype=dtype) for _ in range(2))
    flop = 2.0 * n ** 3
    reps = 1 if device.type == "cpu" else 10
    for _ in range(2):  # warm up
        matmul(a, b)
    synchronize(device)
    best = 0.0
    deadline = time.perf_counter() + budget_s
    for i in range(50):
        t0 = time.perf_counter()
        for _ in range(reps):
            matmul(a, b)
        synchronize(device)
        dt = time.perf_counter() - t0
        best = max(best, flop * reps / dt)
        if time.perf_counter() > deadline and i >= 2:
            break
    return best


def _read_cache(path: Path) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def peak_key(device, dtype) -> str:
    """What a measured peak is cached under: the device, the dtype, torch's version and the GEMM."""
    device = torch.device(device)
    key = f"{device_name(device)}|{str(dtype).replace('torch.', '')}|torch={torch.__version__}"
    return key + "|nanofast-gemm" if _nanofast_gemm(device, dtype) else key


def peak_flops(device, dtype=torch.float32, fallback_dir: str | os.PathLike | None = None,
               verbose: bool = True, refresh: bool = False) -> float:
    """This device's matmul peak in FLOP/s at `dtype`: measured once, then read from the cache;
    refresh=True measures it again and replaces the cached value."""
    device = torch.device(device)
    key = peak_key(device, dtype)
    dirs = [cache_root()] + ([Path(fallback_dir)] if fallback_dir else [])
    if not refresh:
        for d in dirs:
            cached = _read_cache(d / PEAK_CACHE_NAME).get(key)
            if isinstance(cached, (int, float)) and cached > 0:
                return float(cached)
    if verbose:
        print(f"measuring this device's matmul peak for MFU ({key}) ...", flush=True)
    value = measure_matmul_flops(device, dtype)
    if verbose:
        print(f"matmul peak: {value / 1e9:,.1f} GFLOP/s (cached in {PEAK_CACHE_NAME})", flush=True)
    for d in dirs:
        try:
            path = d / PEAK_CACHE_NAME
            data = _read_cache(path)
            data[key] = value
            atomic_write(path, lambda f: f.write(json.dumps(data, indent=1, sort_keys=True).encode()),
                         durable=False)
            break
        except OSError:
            continue
    return value


# ----------------------------------------------------------------------------------------------
# JSONL log

class MetricsLog:
    """Appends records (dicts of plain values) to a JSONL file, one per line, flushed each time."""

    def __init__(self, path: str | os.PathLike, truncate_from_iter: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_from_iter is not None:
            self.drop_from(truncate_from_iter)

    def drop_from(self, iter_num: int) -> None:
        """Forget records of iterations >= iter_num (a resumed run logs them again)."""
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("iter", -1) < iter_num]
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file (a torn last line, e.g. after a crash, is skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out


# ----------------------------------------------------------------------------------------------
# loss plot

def plot_losses(jsonl_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> None:
    """Train loss per logged iteration, and the evaluated train/val losses, against iterations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_jsonl(jsonl_path)
    it_train = [(r["iter"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if it_train:
        ax.plot([i for i, _ in it_train], [v for _, v in it_train], lw=0.8, alpha=0.35, color="C0",
                label="train loss (per iteration)")
    if evals:
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", color="C0", label="train loss (eval)")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", color="C1", label="val loss (eval)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if it_train or evals:
        ax.legend()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"), durable=False)
