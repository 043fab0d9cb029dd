"""The benchmark suite's report: every benchmark records its case here, and the end of the run prints
one table (time, GFLOP/s or GB/s, ratio to the baseline in the same run, CPU/GPU speedup), writes it
to bench/results/report.md with the raw numbers in report.json, and plots the sweeps. The baseline is
torch eager, or for a lever (providers "with" and "without") the run without it."""
import json
import os
import platform
import shlex
import subprocess
import time
from collections import defaultdict

import pytest
import torch

import nanofast.allocator

# Every case runs with nanofast-train's CPU allocator setting (freed memory kept, not page-faulted back
# in), for both providers; bench_train.py measures that lever on its own, in subprocesses.
nanofast.allocator.retain_freed_memory()

RESULTS_DIR = os.environ.get("NANOFAST_BENCH_DIR", os.path.join(os.path.dirname(__file__), "results"))
_records = []
_notes = []


class Recorder:
    """record(benchmark, group, provider, device, work, unit) after benchmark.pedantic(...) ran."""

    def note(self, line):
        """A line printed under the table (figures the table has no column for, such as peak memory)."""
        _notes.append(line)

    def __call__(self, benchmark, **case):
        stats = benchmark.stats.stats
        self.seconds(stats.median, stats.rounds, **case)

    def seconds(self, seconds, rounds, *, op, case, mode, dtype, provider, device, work, unit, peak_bytes=None):
        """A time measured outside pytest-benchmark (in a subprocess, for a process-wide setting).
        peak_bytes: a memory figure measured beside it (listed under the table; the case says how)."""
        _records.append(dict(op=op, case=case, mode=mode, dtype=str(dtype).replace("torch.", ""), provider=provider,
                             device=device, seconds=seconds, rate=work / seconds / 1e9, unit=unit, rounds=rounds,
                             peak_bytes=peak_bytes))


@pytest.fixture
def record():
    return Recorder()


def timed(benchmark, fn, device, budget_s=1.0, warmup_rounds=1):
    """Runs fn under pytest-benchmark with a round count sized to about budget_s of work (at least 3
    rounds). warmup_rounds: pytest-benchmark's warm-up rounds after this helper's own warm-up call
    and probe (0 for cases of seconds per call, such as a training step)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    run()  # warm-up (and compilation, for torch.compile)
    import time

    t0 = time.perf_counter()
    run()
    once = max(time.perf_counter() - t0, 1e-6)
    iterations = max(1, min(100, int(2e-3 / once)))  # amortise the timer below 2 ms per call
    rounds = max(3, min(200, int(budget_s / (once * iterations))))
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)


# the rows of a case, in order; a lever's case compares "with" against its baseline "without"
PROVIDERS = ["nanofast", "torch", "compile", "naive", "with", "without"]
BASELINE_OF_LEVER = "without"


def _key(r):
    return (r["op"], r["case"], r["mode"], r["dtype"])


def _table():
    by_case = defaultdict(dict)
    for r in _records:
        by_case[_key(r)][(r["provider"], r["device"])] = r
    has_cuda = any(r["device"] == "cuda" for r in _records)
    lines = ["| op | case | mode | dtype | provider | CPU time | CPU rate | vs baseline (CPU) | GPU time | GPU rate "
             "| vs baseline (GPU) | GPU speedup over CPU |", "|" + "---|" * 12]
    for key in sorted(by_case):
        entries = by_case[key]
        providers = sorted({p for p, _ in entries}, key=PROVIDERS.index)
        for p in providers:
            cells = []
            for dev in ("cpu", "cuda"):
                r = entries.get((p, dev))
                base = entries.get(("torch", dev)) or entries.get((BASELINE_OF_LEVER, dev))
                if r is None:
                    cells += ["no CUDA" if dev == "cuda" and not has_cuda else "-"] * 3
                    continue
                ratio = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
                cells += [f"{r['seconds'] * 1e3:.3f} ms", f"{r['rate']:.1f} {r['unit']}", ratio]
            cpu, gpu = entries.get((p, "cpu")), entries.get((p, "cuda"))
            speedup = f"{cpu['seconds'] / gpu['seconds']:.1f}x" if cpu and gpu else ("no CUDA" if not has_cuda else "-")
            lines.append("| " + " | ".join(list(key) + [p] + cells + [speedup]) + " |")
    return "\n".join(lines + _training_ratios() + _peak_memory() + (["", *_notes] if _notes else []))


def _training_ratios():
    """Issue 6's figures: nanofast's bfloat16 step against the float32 step with torch's kernels."""
    steps = {(r["case"], r["dtype"], r["provider"], r["device"]): r for r in _records if r["op"] == "train step"}
    lines = []
    for (case, dtype, provider, device), r in sorted(steps.items()):
        base = steps.get((case, "float32", "torch", device))
        if provider == "nanofast" and dtype != "float32" and base:
            lines.append(f"\ntrain step {case} ({device}): nanofast {dtype} {r['seconds'] * 1e3:.2f} ms vs torch "
                         f"kernels float32 {base['seconds'] * 1e3:.2f} ms: {base['seconds'] / r['seconds']:.2f}x")
    return lines


def _peak_memory():
    """The memory figures recorded beside the times, one line each, with the ratio to the baseline's."""
    rows = [r for r in _records if r.get("peak_bytes") is not None]
    lines = ["\npeak memory (how it was measured: see the benchmark's docstring):"] if rows else []
    by_key = {(_key(r), r["provider"], r["device"]): r for r in rows}
    for r in rows:
        base = by_key.get((_key(r), "torch", r["device"])) or by_key.get((_key(r), BASELINE_OF_LEVER, r["device"]))
        ratio = f" ({r['peak_bytes'] / base['peak_bytes']:.2f}x the baseline's)" if base and base is not r else ""
        lines.append(f"- {r['op']}, {r['case']}, {r['mode']}, {r['dtype']}, {r['provider']} ({r['device']}): "
                     f"{r['peak_bytes'] / 2**20:.1f} MiB{ratio}")
    return lines


def _plot_sweeps(path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sweeps = defaultdict(lambda: defaultdict(list))
    for r in _records:
        if r["case"].startswith("sweep:"):
            axis, value = r["case"].split(":", 1)[1].split("=")
            sweeps[(r["op"], r["mode"], r["dtype"], axis)][(r["provider"], r["device"])].append((int(value), r["rate"],
                                                                                                 r["unit"]))
    if not sweeps:
        return None
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.5), squeeze=False)
    for ax, (key, series) in zip(axes[0], sorted(sweeps.items())):
        for (prov, dev), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{prov} ({dev})")
        op, mode, dtype, axis = key
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.set_ylabel(next(iter(series.values()))[0][2])
        ax.set_title(f"{op} {mode} {dtype}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _commit():
    """The checkout's commit (with '+' for uncommitted changes), so a saved report says what it measured."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+" if dirty else "")) or "unknown"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _records:
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    table = _table()
    header = (f"nanofast benchmark report: {_cpu_model()}, "
              f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
              f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}\n\n"
              f"- command: `pytest {shlex.join(config.invocation_params.args)}`\n"
              f"- finished: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit()}")
    with open(os.path.join(RESULTS_DIR, "report.md"), "w") as f:
        f.write(f"{header}\n\n{table}\n")
    with open(os.path.join(RESULTS_DIR, "report.json"), "w") as f:
        json.dump({"header": header, "records": _records}, f, indent=1)
    plot = _plot_sweeps(os.path.join(RESULTS_DIR, "sweeps.png"))
    terminalreporter.write_sep("=", "nanofast benchmark report")
    terminalreporter.write_line(header)
    for line in table.splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"written: {RESULTS_DIR}/report.md, report.json" + (", sweeps.png" if plot else ""))
