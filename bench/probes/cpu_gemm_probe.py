"""nanofast's GEMMs against torch's matmul on this machine's CPU, for the GEMM policy (csrc/
dispatch.cpp, gemm_preferred: nanofast's on every CPU but Intel's, where MKL and oneDNN have AVX-512
and AMX code).

Prints the CPU, whether nanofast.ops.linear uses the GEMMs here by default, and GFLOP/s of both for
nn.Linear's forward product at nanoGPT's shapes, at 2 threads and at all of them (the GEMMs forced on
with NANOFAST_GEMM=1 for the timing): float32 (MKL), and where the CPU has AVX512-BF16 the bfloat16
product of float32 operands, nanofast's rounding while packing against autocast's casts and oneDNN's
bfloat16 matmul.  Usage: python bench/probes/cpu_gemm_probe.py
"""
import os
import time

import torch

from nanofast import _C, allocator
from nanofast.ops import cpu


def vendor():
    try:
        with open("/proc/cpuinfo") as f:
            fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        return f"{fields.get('vendor_id', '?')} / {fields.get('model name', '?')}"
    except OSError:
        return "unknown"


def gflops(fn, flop, seconds=0.5):
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return flop * n / (time.perf_counter() - t0) / 1e9


def main():
    allocator.retain_freed_memory()  # as nanofast-train: no page faults on each call's output
    print(f"CPU: {vendor()}; isa {_C.isa()}; ops.linear uses nanofast's GEMMs by default: float32 {_C.has_gemm()}, "
          f"bfloat16 {_C.has_gemm_bf16()}")
    os.environ["NANOFAST_GEMM"] = "1"  # read on each call: forces the GEMM for the timing below
    if not _C.has_gemm():
        print("no AVX-512 here: nothing to compare")
        return
    all_threads = torch.get_num_threads()
    for threads in sorted({2, all_threads}):
        torch.set_num_threads(threads)
        for N, K, M in ((768, 128, 512), (16384, 384, 1536)):
            x, w = torch.randn(N, K), torch.randn(M, K)
            flop = 2 * N * K * M
            ours, theirs = gflops(lambda: cpu.mm(x, w.t()), flop), gflops(lambda: torch.mm(x, w.t()), flop)
            print(f"threads {threads:3d}  x {N}x{K} @ W^T {K}x{M}: nanofast {ours:7.1f} GFLOP/s, torch {theirs:7.1f} "
                  f"GFLOP/s ({ours / theirs:.2f}x)")
            if _C.has_gemm_bf16():
                bf16 = torch.bfloat16
                ours = gflops(lambda: cpu.mm(x, w.t(), dtype=bf16), flop)
                theirs = gflops(lambda: torch.mm(x.to(bf16), w.t().to(bf16)), flop)
                print(f"{'':13s}bfloat16 products: nanofast {ours:7.1f} GFLOP/s, torch (casts + oneDNN) "
                      f"{theirs:7.1f} GFLOP/s ({ours / theirs:.2f}x)")
    torch.set_num_threads(all_threads)


if __name__ == "__main__":
    main()
