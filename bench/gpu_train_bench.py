"""Whole training steps on a GPU, each way nanofast and torch can run them (run by bench/gpu_check.sh,
and by `pytest --benchmark -k train` on a CUDA machine through bench_train.py).

Configs: nanoGPT's shakespeare_char GPU config (6 layers, 6 heads, 384 wide, B=64, T=256, dropout 0.2)
and GPT-2 124M (12 layers, 12 heads, 768 wide, B=16, T=1024, vocabulary 50304), bfloat16 autocast with
TF32 matmuls, as nanofast-train runs them. The step is nanofast-train's (training.train_step: forward,
backward, gradient clipping, AdamW), on one fixed batch already on the GPU.

Modes, side by side in one process:
    torch compiled        kernels=torch, torch.compile: nanoGPT's own setup, the baseline
    torch eager           kernels=torch
    nanofast eager        kernels=nanofast (the backward on the calling thread: training.backward_threads)
    nanofast compiled     torch.compile, the Triton kernels as triton_ops
    nanofast cuda graphs  torch.compile(mode="reduce-overhead"): each step replayed as CUDA graphs

Per mode: wall-clock per step (median of rounds of back-to-back steps), host time per step (the time
the Python takes to issue one step while the GPU is held busy by a sleep kernel, so that it never
waits for the GPU) and GPU time per step (the GPU's time for the step once all of it is queued,
between two events around it). Host time above GPU time means the GPU waits for the host.

Writes a markdown table (--out) and prints one JSON line per measurement.
"""
import argparse
import json
import statistics
import sys
import time

import torch

CONFIGS = {
    "shakespeare": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, vocab_size=65),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, dropout=0.0,
                      vocab_size=50304),
}
# (name, kernels, compile mode or None for eager): the baseline first, then nanofast's modes
MODES = [
    ("torch compiled", "torch", "default"),
    ("nanofast cuda graphs", "nanofast", "reduce-overhead"),
    ("nanofast compiled", "nanofast", "default"),
    ("nanofast eager", "nanofast", None),
    ("torch eager", "torch", None),
]


def log(record):
    print("JSON " + json.dumps(record), flush=True)


def build(cfg, kernels, compile_mode, device="cuda"):
    """(step, model): nanofast-train's step for this mode, on one fixed batch."""
    from nanofast.model import GPT, GPTConfig
    from nanofast.training import enable_tf32, precision, train_step

    enable_tf32()
    args = {k: v for k, v in cfg.items() if k != "batch_size"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1337)  # the same initial weights in every mode
        model = GPT(GPTConfig(**args, bias=False, kernels=kernels)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cuda")
    model.train()
    run = model if compile_mode is None else torch.compile(
        model, mode=None if compile_mode == "default" else compile_mode)
    prec = precision("bfloat16", "cuda")
    g = torch.Generator().manual_seed(0)
    B, T = cfg["batch_size"], cfg["block_size"]
    data = torch.randint(cfg["vocab_size"], (B, T + 1), generator=g)
    X, Y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)

    def step():
        return train_step(run, optimizer, prec, lambda i: (X, Y), 1, 1.0, 6e-4)[0]
    return step


def _sleep_cycles_per_ms():
    """Cycles of torch.cuda._sleep per millisecond on this GPU (measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    torch.cuda.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def measure(step, wall_rounds=5, per_round=10, trials=5):
    """{wall_ms, host_ms, gpu_ms} of one step; see the module docstring."""
    torch.cuda.synchronize()
    walls = []
    for _ in range(wall_rounds):
        t0 = time.perf_counter()
        for _ in range(per_round):
            step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / per_round * 1e3)
    wall = statistics.median(walls)
    cycles_per_ms = _sleep_cycles_per_ms()
    sleep_ms = min(4000.0, max(50.0, 4 * wall))
    hosts, gpus = [], []
    for _ in range(trials):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
        begin.record()
        t0 = time.perf_counter()
        step()
        host = (time.perf_counter() - t0) * 1e3
        end.record()
        torch.cuda.synchronize()
        hosts.append(host)
        gpus.append(begin.elapsed_time(end))
    host = statistics.median(hosts)
    # a host that waited for the sleep synchronised with the GPU inside the step: the GPU figure is
    # then not the step's alone
    synced = host >= 0.8 * sleep_ms
    return dict(wall_ms=wall, host_ms=host, gpu_ms=statistics.median(gpus), host_synced=synced)


def run_config(name, modes, deadline, on_row, warmup=4):
    """Measures each mode of config `name`, handing each row to on_row as it comes."""
    cfg = CONFIGS[name]
    for mode, kernels, compile_mode in modes:
        if time.time() > deadline:
            on_row(dict(config=name, mode=mode, skipped="out of time"))
            continue
        t0 = time.time()
        try:
            step = build(cfg, kernels, compile_mode)
            for _ in range(warmup):  # compiles; CUDA graphs record on the second and later calls
                loss = step()
            torch.cuda.synchronize()
            setup_s = time.time() - t0
            big = name == "gpt2-124m"
            row = dict(config=name, mode=mode, setup_s=round(setup_s, 1), loss=float(loss),
                       **measure(step, wall_rounds=3 if big else 5, per_round=5 if big else 10))
        except Exception as e:  # one mode failing must not lose the others' rows
            row = dict(config=name, mode=mode, error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            step = None
            torch.cuda.empty_cache()
        log(row)
        on_row(row)


def table(rows, cpu_ms=None):
    """Markdown: one row per (config, mode), with the speed against torch compiled in the same run."""
    base = {r["config"]: r["wall_ms"] for r in rows if r["mode"] == "torch compiled" and "wall_ms" in r}
    out = ["| config | mode | ms/step | vs torch compiled | host ms/step | GPU ms/step | host < GPU | compile+warm-up s | loss |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "wall_ms" not in r:
            out.append(f"| {r['config']} | {r['mode']} | {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        speed = f"{base[r['config']] / r['wall_ms']:.2f}x" if r["config"] in base else "n/a"
        host = f"{r['host_ms']:.2f}" + (" (synced)" if r["host_synced"] else "")
        out.append(f"| {r['config']} | {r['mode']} | {r['wall_ms']:.2f} | {speed} | {host} | {r['gpu_ms']:.2f} | "
                   f"{'yes' if r['host_ms'] < r['gpu_ms'] else 'no'} | {r['setup_s']} | {r['loss']:.4f} |")
    if cpu_ms:
        out += ["", "CPU-versus-GPU speedup of the whole step (CPU: the step as nanofast-train runs it on the CPU, "
                "bfloat16, measured on the development machine, bench/cpu_last.md):", "",
                "| config | CPU ms/step | best GPU mode | GPU ms/step | speedup |", "|---|---|---|---|---|"]
        for config, ms in cpu_ms.items():
            gpu = [r for r in rows if r["config"] == config and "wall_ms" in r and r["mode"].startswith("nanofast")]
            if gpu:
                best = min(gpu, key=lambda r: r["wall_ms"])
                out.append(f"| {config} | {ms:.0f} | {best['mode']} | {best['wall_ms']:.2f} | "
                           f"{ms / best['wall_ms']:.0f}x |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_train_bench.md")
    ap.add_argument("--configs", default="shakespeare,gpt2-124m")
    ap.add_argument("--modes", default="", help="comma-separated mode names (default: all)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; modes past it are skipped")
    ap.add_argument("--cpu-ms", default="", help="config=ms,... the CPU step times for the speedup table")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_train_bench: no CUDA device", file=sys.stderr)
        return 2
    cpu_ms = dict((k, float(v)) for k, v in (kv.split("=") for kv in a.cpu_ms.split(",") if kv))
    deadline = time.time() + a.budget
    rows = []
    header = (f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n\n")

    def add(row):  # the table is rewritten after every row, so that a killed run keeps what it measured
        rows.append(row)
        with open(a.out, "w") as f:
            f.write(header + table(rows, cpu_ms))

    modes = [m for m in MODES if not a.modes or m[0] in a.modes.split(",")]
    for name in a.configs.split(","):
        run_config(name, modes, deadline, add)
    print(header + table(rows, cpu_ms))
    return 0 if all("wall_ms" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
