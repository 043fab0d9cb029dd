"""How the chunk size of nanofast.ops.linear_cross_entropy trades time for memory: forward+backward
at a GPT-2-shaped head (B * T = 1024 rows, 768 wide, vocabulary 50304) for a range of rows per chunk,
float32 and bfloat16 autocast, beside torch's F.linear + F.cross_entropy. The settings take turns;
prints each one's best of three calls and the chunk's logits in MiB.

    python bench/probes/cross_entropy_chunks.py [rows ...]
"""
import sys
import time

import torch
import torch.nn.functional as F

import nanofast
from nanofast.ops import chunked_cross_entropy

N, C, V = 1024, 768, 50304


def call(fn, x, w, t, dtype):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = fn(x, w, t)
        torch.autograd.grad(loss, (x, w))
    return run


def fused(rows):
    def fn(x, w, t):
        chunked_cross_entropy.CHUNK_MIN_ROWS, chunked_cross_entropy.CHUNK_BYTES = rows, 0
        return nanofast.ops.linear_cross_entropy(x, w, t)
    return fn


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [64, 128, 256, 512, 1024]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).requires_grad_()
    w = (torch.randn(V, C, generator=g) / C ** 0.5).requires_grad_()
    t = torch.randint(V, (N,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        settings = {"torch": lambda x, w, t: F.cross_entropy(F.linear(x, w), t)}
        settings.update({rows: fused(rows) for rows in sizes})
        runs = {k: call(fn, x, w, t, dtype) for k, fn in settings.items()}
        best = {k: float("inf") for k in runs}
        for _ in range(3):  # the settings take turns, so that a drift of the machine's speed hits all alike
            for k, run in runs.items():
                t0 = time.perf_counter()
                run()
                best[k] = min(best[k], time.perf_counter() - t0)
        print(f"{str(dtype)[6:]}: torch {best['torch'] * 1e3:.0f} ms", flush=True)
        for rows in sizes:
            print(f"  {rows:5d} rows/chunk ({rows * V * 4 / 2**20:6.1f} MiB logits): {best[rows] * 1e3:.0f} ms "
                  f"({best['torch'] / best[rows]:.2f}x torch)", flush=True)


if __name__ == "__main__":
    main()
