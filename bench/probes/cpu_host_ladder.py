"""Where a small op's CPU time goes: the kernel alone, its launcher, the op, and the autograd floor.

At nanoGPT's CPU-config shapes (LayerNorm 768x128, attention B12 H4 T64 D32) an op's forward+backward
is tens of microseconds, and part of it is not the kernel's. Each rung below adds one layer:

* the raw C++ call (nanofast._C) with preallocated outputs,
* the launcher (nanofast.ops.cpu: allocations, pointers and strides),
* the op without autograd, then forward+backward through autograd,
* an empty torch.autograd.Function forward+backward on the same inputs: the floor any Python-level
  autograd op pays, next to torch's own op (whose autograd node is C++).

Usage: python bench/probes/cpu_host_ladder.py   (2 threads, median of 9 rounds, microseconds per call)
"""
import time

import torch
import torch.nn.functional as F

from nanofast import _C, ops
from nanofast.ops import cpu


def us(fn, n=3000):
    for _ in range(100):
        fn()
    rounds = []
    for _ in range(9):
        t0 = time.perf_counter()
        for _ in range(n // 9):
            fn()
        rounds.append((time.perf_counter() - t0) / (n // 9))
    return sorted(rounds)[4] * 1e6


class _Empty(torch.autograd.Function):
    """The autograd floor: a Python node that does no work (the gradient of its first input only)."""

    @staticmethod
    def forward(ctx, first, *rest):
        ctx.n_rest = len(rest)
        return torch.empty_like(first)

    @staticmethod
    def backward(ctx, g):
        return (g,) + (None,) * ctx.n_rest


def layer_norm_rungs(N=768, C=128):
    x = torch.randn(N, C, requires_grad=True)
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    dy = torch.randn(N, C)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    y, mean, rstd = cpu.layer_norm_forward(xd, wd, bd, 1e-5)
    dx, dw, db = torch.empty_like(xd), torch.empty(C), torch.empty(C)
    code = cpu._DTYPE_CODE[torch.float32]
    return f"layer_norm fp32 {N}x{C}", [
        ("raw C++ forward", lambda: _C.layer_norm_forward(code, N, C, xd.data_ptr(), C, wd.data_ptr(), bd.data_ptr(),
                                                          y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), 1e-5, 2)),
        ("raw C++ backward", lambda: _C.layer_norm_backward(code, N, C, dy.data_ptr(), C, xd.data_ptr(), C,
                                                            wd.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                                            dx.data_ptr(), dw.data_ptr(), db.data_ptr(), 2)),
        ("launcher forward", lambda: cpu.layer_norm_forward(xd, wd, bd, 1e-5)),
        ("launcher backward", lambda: cpu.layer_norm_backward(dy, xd, wd, mean, rstd, True, True)),
        ("op forward, no grad", lambda: ops.layer_norm(xd, (C,), wd, bd)),
        ("op forward+backward", lambda: torch.autograd.grad(ops.layer_norm(x, (C,), w, b), (x, w, b), dy)),
        ("empty autograd.Function forward+backward", lambda: torch.autograd.grad(_Empty.apply(x, w, b), (x,), dy)),
        ("torch F.layer_norm forward+backward", lambda: torch.autograd.grad(F.layer_norm(x, (C,), w, b), (x, w, b), dy)),
    ]


def attention_rungs(B=12, H=4, T=64, D=32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, T, D, generator=g)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    out, lse = cpu.attention_forward(qd, kd, vd, True, D ** -0.5, 0.0, 0)
    return f"attention fp32 B{B} H{H} T{T} D{D} causal", [
        ("launcher forward", lambda: cpu.attention_forward(qd, kd, vd, True, D ** -0.5, 0.0, 0)),
        ("launcher backward", lambda: cpu.attention_backward(do, qd, kd, vd, out, lse, True, D ** -0.5, 0.0, 0)),
        ("op forward, no grad", lambda: ops.scaled_dot_product_attention(qd, kd, vd, is_causal=True)),
        ("op forward+backward", lambda: torch.autograd.grad(
            ops.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do)),
        ("empty autograd.Function forward+backward", lambda: torch.autograd.grad(_Empty.apply(q, k, v), (q,), do)),
        ("torch SDPA forward+backward", lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do)),
    ]


def main():
    torch.set_num_threads(2)
    for case, rungs in (layer_norm_rungs(), attention_rungs()):
        print(f"\n{case}: microseconds per call, 2 threads")
        for name, fn in rungs:
            print(f"  {name:45s} {us(fn, 3000 if 'attention' not in case else 900):8.1f}")


if __name__ == "__main__":
    main()
