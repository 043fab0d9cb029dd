"""Where the GPU time goes, and which tiles to use: a profile and a tile sweep of the Triton kernels.

bench/gpu_bench.py times whole calls (launch overhead included). This script separates the two:
* for attention (bf16, causal, nanoGPT's B*H*T) and LayerNorm it prints, per call, the wall time and
  the GPU time of each kernel (torch.profiler), so launch-bound shapes show up as wall >> kernels;
* it times the host side of the ops layer by layer (launcher, op without and with autograd, backward)
  next to torch, to find where a launch-bound call's time goes;
* it sweeps attention's tile configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel,
  checks each against torch's flash attention, and prints the kernel time of each, fastest first.

Usage (on a CUDA machine): python bench/gpu_profile.py [--quick] --out results.md
Writes markdown to --out and one JSON line per measurement to stdout.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def log(record):
    print("JSON " + json.dumps(record), flush=True)


def kernel_times(fn, iters=20):
    """{kernel name: GPU microseconds per call of fn}, from torch.profiler over `iters` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if t > 0:
            out[e.key] = t / iters
    return out


def wall_us(fn, iters=50):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def python_profile(fn, iters=30, top=18):
    """The Python functions that take the host's time in fn (cProfile, sorted by own time): where the
    launch overhead of a launch-bound call goes."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def short(name, n=60):
    return name if len(name) <= n else name[: n - 3] + "..."


def profile_rows(lines):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import nanofast.ops as ops

    lines += ["### Wall time against GPU kernel time, per call (µs)", "",
              "| case | wall | kernels | kernel breakdown |", "|---|---|---|---|"]

    def row(case, fn):
        wall = wall_us(fn)
        ks = kernel_times(fn)
        total = sum(ks.values())
        parts = ", ".join(f"{short(k, 40)} {v:.0f}" for k, v in sorted(ks.items(), key=lambda kv: -kv[1])[:6])
        lines.append(f"| {case} | {wall:.0f} | {total:.0f} | {parts} |")
        log(dict(kind="profile", case=case, wall_us=wall, kernel_us=total, kernels=ks))

    for T, D in ((1024, 64), (1024, 128), (4096, 64)):
        B, H = max(1, 64 * 256 // T), 6
        q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)

        def ours():
            ops.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

        def theirs():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

        row(f"attention fwd+bwd B={B} T={T} D={D} ours", ours)
        row(f"attention fwd+bwd B={B} T={T} D={D} torch", theirs)
        if T == 1024 and D == 64:
            host = python_profile(ours)
    lines += ["", "Host time of ours (attention fwd+bwd, T=1024 D=64, 30 calls), cProfile by own time:", "",
              "```", host.strip(), "```", "", "| case | wall | kernels | kernel breakdown |", "|---|---|---|---|"]

    for N, C in ((16384, 384), (65536, 1024)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(C, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(C, device="cuda", dtype=dtype, requires_grad=True)
            dy = torch.randn(N, C, device="cuda", dtype=dtype)
            name = str(dtype).replace("torch.", "")
            row(f"layer_norm fwd+bwd {N}x{C} {name} ours",
                lambda: ops.layer_norm(x, (C,), w, b).backward(dy))
            row(f"layer_norm fwd+bwd {N}x{C} {name} torch",
                lambda: F.layer_norm(x, (C,), w, b).backward(dy))
    lines.append("")


def host_ladder_rows(lines):
    """Host time per call, one layer of the call stack at a time: where the ops' launch overhead comes
    from (a launch-bound call's wall time is its host time). Each rung adds one layer to the one above."""
    import nanofast.kernels as K
    import nanofast.ops as ops

    lines += ["### Host overhead ladder: wall µs per call, 200 calls back to back", "",
              "| case | rung | µs |", "|---|---|---|"]

    def rung(case, name, fn):
        us = wall_us(fn, iters=200)
        lines.append(f"| {case} | {name} | {us:.0f} |")
        log(dict(kind="ladder", case=case, rung=name, us=us))

    # The floor under every rung: a Triton launch with one argument and with as many as attention's
    # forward (34), and an autograd.Function that does nothing, whose backward is Python run by
    # autograd's CUDA worker thread (and, with multithreading off, by the calling thread).
    import triton

    @triton.jit
    def _one_arg(X):
        pass

    @triton.jit
    def _many_args(X, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
                   a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33):
        pass

    class _Null(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, dy):
            return dy

    z = torch.empty(16, device="cuda")
    zg = torch.zeros(16, device="cuda", requires_grad=True)
    dz = torch.ones(16, device="cuda")
    ints = [7 * i + 1 for i in range(33)]
    rung("floor", "Triton launch, 1 argument", lambda: _one_arg[(1,)](z))
    rung("floor", "Triton launch, 34 arguments", lambda: _many_args[(1,)](z, *ints))
    def device_context():
        with torch.cuda.device(z.device):
            pass

    rung("floor", "torch.cuda.device(t.device) enter+exit", device_context)
    rung("floor", "empty autograd.Function fwd+bwd (Python backward)", lambda: _Null.apply(zg).backward(dz))
    rung("floor", "torch.empty_like(x).add_(1) fwd+bwd via torch ops", lambda: (zg * 2).backward(dz))

    def single_thread(fn):
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return run

    rung("floor", "empty autograd.Function fwd+bwd, autograd multithreading off",
         single_thread(lambda: _Null.apply(zg).backward(dz)))

    B, H, T, D = 16, 6, 1024, 64
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = K.attention_forward(q, k, v, True, D ** -0.5)
    case = f"attention bf16 B={B} T={T} D={D}"
    rung(case, "the forward's two allocations alone (torch.empty)",
         lambda: (torch.empty_like(q), torch.empty(B, H, T, device="cuda")))
    rung(case, "launcher forward (nanofast.kernels.attention_forward)", lambda: K.attention_forward(q, k, v, True, D ** -0.5))
    rung(case, "launcher backward (3 kernels)", lambda: K.attention_backward(do, q, k, v, out, lse, True, D ** -0.5))
    rung(case, "ops forward, no grad", lambda: ops.scaled_dot_product_attention(q, k, v, is_causal=True))
    rung(case, "ops forward, inputs require grad", lambda: ops.scaled_dot_product_attention(qg, kg, vg, is_causal=True))
    rung(case, "ops forward + backward", lambda: ops.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do))
    rung(case, "ops forward + backward, autograd multithreading off",
         single_thread(lambda: ops.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)))
    rung(case, "torch flash forward, no grad", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    rung(case, "torch flash forward + backward",
         lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do))

    N, C = 16384, 384
    x, dy = (torch.randn(N, C, device="cuda") for _ in range(2))
    w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    xg, wg, bg = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y, mean, rstd = K.layer_norm_forward(x, w, b, 1e-5)
    case = f"layer_norm fp32 {N}x{C}"
    rung(case, "launcher forward", lambda: K.layer_norm_forward(x, w, b, 1e-5))
    rung(case, "launcher backward (2 kernels)", lambda: K.layer_norm_backward(dy, x, w, mean, rstd, True, True))
    rung(case, "ops forward, no grad", lambda: ops.layer_norm(x, (C,), w, b))
    rung(case, "ops forward, inputs require grad", lambda: ops.layer_norm(xg, (C,), wg, bg))
    rung(case, "ops forward + backward", lambda: ops.layer_norm(xg, (C,), wg, bg).backward(dy))
    rung(case, "ops forward + backward, autograd multithreading off",
         single_thread(lambda: ops.layer_norm(xg, (C,), wg, bg).backward(dy)))
    rung(case, "torch forward + backward", lambda: F.layer_norm(xg, (C,), wg, bg).backward(dy))
    lines.append("")


# Candidate tiles per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is the query tile.
CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3)],
    "dkdv": [(32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 4, 3),
             (128, 128, 8, 2)],
    "dq": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3), (128, 64, 4, 3)],
}
# float32 dots run on the FMA units (IEEE precision): register-bound, so smaller tiles and fewer stages.
CANDIDATES_FP32 = {
    "fwd": [(64, 32, 8, 1), (32, 32, 4, 1), (64, 64, 8, 1), (32, 64, 4, 1), (64, 32, 4, 2), (128, 32, 8, 1)],
    "dkdv": [(32, 32, 4, 1), (32, 64, 8, 1), (64, 32, 8, 1), (16, 64, 4, 1), (32, 32, 4, 2)],
    "dq": [(32, 32, 4, 1), (64, 32, 8, 1), (32, 64, 8, 1), (64, 64, 8, 1), (32, 32, 4, 2)],
}
KERNEL_NAMES = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}


def sweep_rows(lines, quick, deadline):
    """Per kernel, the GPU time of each candidate tile, fastest first: bf16 with dropout and float32
    first, then bf16 without dropout.
    Errors are against the current configuration's results (same dropout mask), and for bf16 without
    dropout against torch's flash attention."""
    import nanofast.kernels.attention as A
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lines += ["### Attention tile sweep (causal): GPU µs per kernel call", "",
              "| dtype | dropout | T | D | kernel | BLOCK_M, BLOCK_N, warps, stages | µs | max abs diff vs reference |",
              "|---|---|---|---|---|---|---|---|"]
    cases = [(torch.bfloat16, 0.1, 1024, 64), (torch.float32, 0.0, 1024, 64), (torch.bfloat16, 0.0, 1024, 64),
             (torch.bfloat16, 0.0, 1024, 128)]
    if not quick:
        cases += [(torch.bfloat16, 0.1, 1024, 128), (torch.float32, 0.0, 1024, 128), (torch.bfloat16, 0.0, 4096, 64)]
    for dtype, p, T, D in cases:
        B, H = max(1, 64 * 256 // T), 6
        q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype) for _ in range(4))
        key = (dtype != torch.float32, max(16, A.next_pow2(D)) <= 64, p > 0)
        base = dict(A._GPU_CONFIGS[key])
        scale = D ** -0.5
        seed = 1234

        def fn():
            out, lse = A.attention_forward(q, k, v, True, scale, p, seed)
            grads = A.attention_backward(do, q, k, v, out, lse, True, scale, p, seed)
            return out, grads

        if dtype == torch.bfloat16 and p == 0:
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ref = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
            ref_all = (ref, *torch.autograd.grad(ref, (qg, kg, vg), do))
        else:
            out, grads = fn()
            ref_all = (out, *grads)
        name = str(dtype).replace("torch.", "")
        cands = CANDIDATES if dtype != torch.float32 else CANDIDATES_FP32
        for kernel, kernel_cands in cands.items():
            results = []
            for cfg in kernel_cands:
                if time.monotonic() > deadline:
                    lines.append(f"| {name} | {p} | {T} | {D} | {kernel} | (out of time) | | |")
                    break
                A._GPU_CONFIGS[key] = dict(base, **{kernel: cfg})
                try:
                    out, grads = fn()
                    err = max((a.float() - b.float()).abs().max().item() for a, b in zip((out, *grads), ref_all))
                    ks = kernel_times(fn, iters=10)
                    us = sum(t for kname, t in ks.items() if KERNEL_NAMES[kernel] in kname)
                    results.append((us, cfg, err))
                    log(dict(kind="sweep", dtype=name, dropout=p, T=T, D=D, kernel=kernel, cfg=cfg, us=us, err=err))
                except Exception as e:  # a tile that does not compile (shared memory, registers)
                    lines.append(f"| {name} | {p} | {T} | {D} | {kernel} | {cfg} | failed: "
                                 f"{short(str(e).splitlines()[0], 80)} | |")
                finally:
                    A._GPU_CONFIGS[key] = dict(base)
            for us, cfg, err in sorted(results):
                mark = " (current)" if cfg == base[kernel] else ""
                lines.append(f"| {name} | {p} | {T} | {D} | {kernel} | {cfg}{mark} | {us:.1f} | {err:.1e} |")
    lines.append("")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_profile.md")
    ap.add_argument("--quick", action="store_true", help="sweep T=1024 only")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds before the sweep stops")
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget
    import triton

    lines = [f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", ""]
    try:
        # Each section on its own: one that fails leaves its error in the report and the others run.
        for section in (lambda: host_ladder_rows(lines), lambda: profile_rows(lines),
                        lambda: sweep_rows(lines, args.quick, deadline)):
            try:
                section()
            except Exception as e:
                import traceback
                traceback.print_exc()
                lines += ["", f"(section failed: {type(e).__name__}: {short(str(e), 300)})", ""]
    finally:
        text = "\n".join(lines) + "\n"
        with open(args.out, "w") as f:
            f.write(text)
        print(text)


if __name__ == "__main__":
    main()
