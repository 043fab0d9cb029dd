"""GPU micro-benchmark of the Triton kernels (run by bench/gpu_check.sh on a CUDA machine).

* Attention forward+backward, bfloat16, causal, against torch's SDPA flash backend, with B*H*T held
  at nanoGPT's GPU config (B=64, H=6, T=256): H=6 and B = 64*256/T, for T in {1024, 4096} and
  head dims 64 and 128. Target: ours at least 0.8x torch's speed.
* LayerNorm forward+backward (the launchers, no autograd overhead) in GB/s against the device's
  measured device-to-device copy bandwidth. Target: at least 80% of it.
* With --only layers (not in the default run, to keep bench/gpu_check.sh's budget): the layers of
  Llama-style models (RMSNorm, add + RMSNorm, SwiGLU, the rotary embedding of q and k), bfloat16,
  forward+backward through autograd, against Hugging Face's torch code in eager mode.

Writes a markdown table to --out and prints it together with one JSON line per measurement.
"""
import argparse
import json
import pathlib
import signal
import sys
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_kernels():
    import nanofast.kernels as K  # the installed package (its public functions run through nanofast.ops)

    return K, "nanofast.kernels"


def bench(fn, grad_to_none=None, rep=200):
    """Median milliseconds of fn (triton.testing.do_bench flushes L2 between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def log(record):
    print("JSON " + json.dumps(record), flush=True)


def attention_rows(K, quick, rows, on_row):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H = 6
    for T in (1024, 4096):
        B = max(1, 64 * 256 // T)
        for D in (64, 128):
            shape = (B, H, T, D)
            q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_(True)

            def ours_fwd():
                return K.scaled_dot_product_attention(q, k, v, is_causal=True)

            def torch_fwd():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            # Sanity first: the two agree (a benchmark of a wrong kernel is worthless).
            with torch.no_grad():
                err = (ours_fwd().float() - torch_fwd().float()).abs().max().item()
            t_of = bench(lambda: ours_fwd())
            t_tf = bench(lambda: torch_fwd())
            t_o = bench(lambda: ours_fwd().backward(do), grad_to_none=[q, k, v])
            t_t = bench(lambda: torch_fwd().backward(do), grad_to_none=[q, k, v])
            # Causal FLOPs: forward 4*B*H*T*T*D/2, backward 2.5x the forward (FlashAttention's count).
            fwd_flops = 4 * B * H * T * T * D / 2
            tflops = lambda ms, f: f / (ms * 1e-3) / 1e12  # noqa: E731
            rec = dict(kind="attention", B=B, H=H, T=T, D=D, dtype="bf16", causal=True, max_abs_diff_fwd=err,
                       ours_fwd_ms=t_of, torch_fwd_ms=t_tf, ours_fwdbwd_ms=t_o, torch_fwdbwd_ms=t_t,
                       ours_tflops=tflops(t_o, 3.5 * fwd_flops), torch_tflops=tflops(t_t, 3.5 * fwd_flops),
                       speed_vs_torch=t_t / t_o)
            log(rec)
            rows.append(rec)
            on_row()
            q = k = v = do = None  # free the GPU memory before the next shape
            torch.cuda.empty_cache()
            if quick:
                return rows
    return rows


def copy_bandwidth():
    n = 512 * 2 ** 20  # 1 GiB of bfloat16 each way
    x = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), rep=100)
    gbs = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
    x = y = None
    torch.cuda.empty_cache()
    return gbs


def layer_norm_rows(K, copy_gbs, quick, rows, on_row):
    shapes = [(16384, 384), (65536, 1024), (32768, 4096)]
    if quick:
        shapes = shapes[1:2]
    for N, C in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(N, C, device="cuda", dtype=dtype)
            dy = torch.randn_like(x)
            w = torch.randn(C, device="cuda", dtype=dtype)
            b = torch.randn(C, device="cuda", dtype=dtype)
            y, mean, rstd = K.layer_norm_forward(x, w, b, 1e-5)
            ref = F.layer_norm(x.float(), (C,), w.float(), b.float())
            err = (y.float() - ref).abs().max().item()
            t_f = bench(lambda: K.layer_norm_forward(x, w, b, 1e-5))
            t_b = bench(lambda: K.layer_norm_backward(dy, x, w, mean, rstd, True, True))
            # Torch's own LayerNorm forward+backward, for reference.
            xs = x.detach().clone().requires_grad_(True)
            ws = w.detach().clone().requires_grad_(True)
            bs = b.detach().clone().requires_grad_(True)
            t_torch = bench(lambda: F.layer_norm(xs, (C,), ws, bs).backward(dy), grad_to_none=[xs, ws, bs])
            es = x.element_size()
            # Compulsory traffic: forward reads x, writes y; backward reads x and dy, writes dx; plus
            # mean and rstd (4 bytes each per row, written then read). Parameters are negligible.
            nbytes = 5 * N * C * es + 16 * N
            gbs = nbytes / ((t_f + t_b) * 1e-3) / 1e9
            rec = dict(kind="layer_norm", N=N, C=C, dtype=str(dtype).replace("torch.", ""), max_abs_diff_fwd=err,
                       fwd_ms=t_f, bwd_ms=t_b, torch_fwdbwd_ms=t_torch, gbs=gbs,
                       torch_gbs=nbytes / (t_torch * 1e-3) / 1e9, copy_gbs=copy_gbs, frac_of_copy=gbs / copy_gbs)
            log(rec)
            rows.append(rec)
            on_row()
            x = dy = xs = None
            torch.cuda.empty_cache()
    return rows


def _layer_cases(K, dev="cuda", shrink=1):
    """(name, shape, inputs, ours, torch's) at a Llama-7B-sized layer's shapes (divided by shrink, for a
    smoke run under Triton's interpreter), each function returning one tensor (a sum of the op's
    outputs) to differentiate."""
    import nanofast.ops

    dt = torch.bfloat16
    N, C, Cm = 16384 // shrink**2, 4096 // shrink, 11008 // shrink
    x, r = torch.randn(N, C, device=dev, dtype=dt), torch.randn(N, C, device=dev, dtype=dt)
    w = torch.rand(C, device=dev, dtype=dt) + 0.5

    def llama_rms(x, w):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    yield ("rms_norm", f"{N}x{C}", [x, w], lambda x, w: K.rms_norm(x, (C,), w, 1e-6, cast_before_weight=True),
           llama_rms)
    # (nanofast.ops runs CUDA tensors on the same Triton kernels as nanofast.kernels)
    yield ("add + rms_norm", f"{N}x{C}", [x, r, w],
           lambda x, r, w: torch.add(*nanofast.ops.add_rms_norm(x, r, (C,), w, 1e-6, cast_before_weight=True)),
           lambda x, r, w: torch.add(x + r, llama_rms(x + r, w)))
    gu = torch.randn(N // 4, 2 * Cm, device=dev, dtype=dt)
    g, u = gu.chunk(2, dim=-1)
    yield ("swiglu", f"{N // 4}x{Cm}", [g, u], K.swiglu, lambda g, u: F.silu(g) * u)
    B, H, Hk, T, D = 8 // shrink, 32 // shrink, 8 // shrink, 2048 // shrink**2, 128 // shrink
    q = torch.randn(B, T, H, D, device=dev, dtype=dt).transpose(1, 2)
    k = torch.randn(B, T, Hk, D, device=dev, dtype=dt).transpose(1, 2)
    ang = torch.arange(T, device=dev)[:, None] * (1e4 ** (-torch.arange(0, D, 2, device=dev) / D))
    emb = torch.cat((ang, ang), dim=-1).expand(B, T, D)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)

    def hf_rope(q, k):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        rot = lambda t: torch.cat((-t[..., D // 2:], t[..., :D // 2]), dim=-1)  # noqa: E731
        return torch.add(*[(t * c + rot(t) * s).sum(1, keepdim=True) for t in (q, k)])

    yield ("rotary q,k", f"B{B} H{H}/{Hk} T{T} D{D}", [q, k],
           lambda q, k: torch.add(*[t.sum(1, keepdim=True) for t in K.apply_rotary_pos_emb(q, k, cos, sin)]), hf_rope)


def layer_rows(K, quick, rows, on_row):
    for name, shape, inputs, ours, theirs in _layer_cases(K):
        leaves = [t.detach().requires_grad_() for t in inputs]
        with torch.no_grad():
            err = (ours(*inputs).float() - theirs(*inputs).float()).abs().max().item()
        dy = torch.randn_like(ours(*inputs))

        def fwdbwd(fn):
            return lambda: torch.autograd.grad(fn(*leaves), leaves, dy)

        t_o, t_t = bench(fwdbwd(ours), rep=100), bench(fwdbwd(theirs), rep=100)
        rec = dict(kind="layer", op=name, shape=shape, dtype="bf16", ours_fwdbwd_ms=t_o, torch_fwdbwd_ms=t_t,
                   speed_vs_torch=t_t / t_o, max_abs_diff_fwd=err)
        log(rec)
        rows.append(rec)
        on_row()
        if quick:
            break
    torch.cuda.empty_cache()
    return rows


def table(attn, ln, copy_gbs, header, layers=()):
    out = [header, ""]
    if attn:
        out += ["### Attention forward+backward, bf16, causal (target: speed vs torch >= 0.8)", "",
                "| B | H | T | D | ours fwd ms | torch fwd ms | ours fwd+bwd ms | torch fwd+bwd ms | ours TFLOP/s | "
                "torch TFLOP/s | speed vs torch | max abs diff |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in attn:
            out.append(f"| {r['B']} | {r['H']} | {r['T']} | {r['D']} | {r['ours_fwd_ms']:.3f} | {r['torch_fwd_ms']:.3f} | "
                       f"{r['ours_fwdbwd_ms']:.3f} | {r['torch_fwdbwd_ms']:.3f} | {r['ours_tflops']:.0f} | "
                       f"{r['torch_tflops']:.0f} | {r['speed_vs_torch']:.2f} | {r['max_abs_diff_fwd']:.1e} |")
        out.append("")
    if layers:
        out += ["### Current models' layers forward+backward, bf16, against Hugging Face's torch code", "",
                "| op | shape | ours ms | torch ms | speed vs torch | max abs diff |", "|---|---|---|---|---|---|"]
        for r in layers:
            out.append(f"| {r['op']} | {r['shape']} | {r['ours_fwdbwd_ms']:.3f} | {r['torch_fwdbwd_ms']:.3f} | "
                       f"{r['speed_vs_torch']:.2f} | {r['max_abs_diff_fwd']:.1e} |")
        out.append("")
    if ln:
        out += [f"### LayerNorm forward+backward (target: >= 80% of copy bandwidth, {copy_gbs:.0f} GB/s)", "",
                "| N | C | dtype | fwd ms | bwd ms | GB/s | % of copy | torch GB/s | max abs diff |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in ln:
            out.append(f"| {r['N']} | {r['C']} | {r['dtype']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['gbs']:.0f} | "
                       f"{100 * r['frac_of_copy']:.0f}% | {r['torch_gbs']:.0f} | {r['max_abs_diff_fwd']:.1e} |")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_bench.md"))
    ap.add_argument("--quick", action="store_true", help="one attention and one LayerNorm shape")
    ap.add_argument("--only", choices=["attention", "layer_norm", "layers"], default=None,
                    help="one section (layers: the current models' layers, run only when named)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device")
    K, where = load_kernels()
    import triton

    header = (f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
              f"kernels from {where} | {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(header, flush=True)
    attn, ln, layers, copy_gbs = [], [], [], [float("nan")]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_table():  # after every row: a timeout still leaves the finished rows behind
        out.write_text(table(attn, ln, copy_gbs[0], header, layers) + "\n")

    # `timeout` sends SIGTERM: turn it into SystemExit so the finally clause below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        if args.only in (None, "layer_norm"):
            copy_gbs[0] = copy_bandwidth()
            log(dict(kind="copy", gbs=copy_gbs[0]))
            layer_norm_rows(K, copy_gbs[0], args.quick, ln, write_table)
        if args.only in (None, "attention"):
            attention_rows(K, args.quick, attn, write_table)
        if args.only == "layers":
            layer_rows(K, args.quick, layers, write_table)
    finally:
        write_table()
        print(table(attn, ln, copy_gbs[0], header, layers), flush=True)


if __name__ == "__main__":
    main()
