"""Which of nanofast's CPU ops beat torch's on each instruction-set build, at the shapes of the training
recipes (nanoGPT's CPU config: B=12, T=64, 4 heads of 32, 128 wide; and its GPU config's 384 wide,
T=256): the measurement behind ops/cpu.py's TORCH_ON_ISA table (which the whole step then confirms: README,
"The CPUs people have").

Each op's forward+backward runs through nanofast.ops (nanofast's kernel on the selected build) and
through torch.nn.functional, alternated round by round in one process so that load drift hits both
sides alike; the table gives the median of each side and torch/nanofast (above 1: nanofast faster).
The routing table is switched off here (as NANOFAST_ISA_ROUTES=0 does): every op runs nanofast's kernel.

Usage: python bench/probes/isa_routes.py [--isas generic,avx2,avx512,avx512bf16] [--rounds 15]
       [--out bench/results/isa_routes.md]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import nanofast.optim
from nanofast import _C, ops


def _fwdbwd(fn, inputs):
    def run():
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
    return run


def _leaf(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def cases(dtype):
    """(name, nanofast step, torch step) at the recipes' shapes, in `dtype` (bfloat16: autocast)."""
    out = []
    for rows, C in ((768, 128), (16384, 384)):
        x, w, b = _leaf(rows, C, dtype=dtype), _leaf(C, dtype=dtype), _leaf(C, dtype=dtype)
        r = _leaf(rows, C, dtype=dtype)
        out.append((f"layer_norm {rows}x{C}", _fwdbwd(lambda x, w, b, C=C: ops.layer_norm(x, (C,), w, b), (x, w, b)),
                    _fwdbwd(lambda x, w, b, C=C: F.layer_norm(x, (C,), w, b), (x, w, b))))
        out.append((f"add_layer_norm {rows}x{C}",
                    _fwdbwd(lambda x, r, w, b, C=C: ops.add_layer_norm(x, r, (C,), w, b)[1], (x, r, w, b)),
                    _fwdbwd(lambda x, r, w, b, C=C: F.layer_norm(x + r, (C,), w, b), (x, r, w, b))))
        g = _leaf(rows, 4 * C, dtype=dtype)
        out.append((f"gelu {rows}x{4 * C}", _fwdbwd(ops.gelu, (g,)), _fwdbwd(F.gelu, (g,))))
        a, wt, bias = _leaf(rows, C, dtype=dtype), _leaf(4 * C, C), _leaf(4 * C)
        out.append((f"linear {rows}x{C}->{4 * C}", _fwdbwd(ops.linear, (a, wt, bias)), _fwdbwd(F.linear, (a, wt, bias))))
        head = _leaf(65, C)
        tgt = torch.randint(65, (rows,))
        out.append((f"lm_head+loss {rows}x{C}->65", _fwdbwd(lambda a, h, tgt=tgt: ops.linear_cross_entropy(a, h, tgt), (a, head)),
                    _fwdbwd(lambda a, h, tgt=tgt: F.cross_entropy(F.linear(a, h), tgt), (a, head))))
    for B, H, T, D in ((12, 4, 64, 32), (64, 6, 256, 64)):
        q, k, v = (_leaf(B, H, T, D, dtype=dtype) for _ in range(3))
        name = f"attention B{B} H{H} T{T} D{D}"
        out.append((name, _fwdbwd(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v)),
                    _fwdbwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v))))
    d = _leaf(768, 128, dtype=dtype)
    out.append(("dropout 768x128 p=0.2", _fwdbwd(lambda t: ops.dropout(t, 0.2), (d,)),
                _fwdbwd(lambda t: F.dropout(t, 0.2), (d,))))
    if dtype is torch.float32:
        for n in (800_000, 10_700_000):
            ps = [torch.nn.Parameter(torch.randn(n // 8)) for _ in range(8)]
            for p in ps:
                p.grad = torch.randn_like(p)
            ours, theirs = nanofast.optim.AdamW(ps, lr=1e-3), torch.optim.AdamW(ps, lr=1e-3)
            out.append((f"AdamW step {n / 1e6:.1f}M params", ours.step, theirs.step))
    return out


def seconds(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--isas", default=_C.available_isas())
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    lines = [f"threads {torch.get_num_threads()} | torch {torch.__version__} | rounds {a.rounds} (median)", "",
             "| ISA | dtype | op | nanofast ms | torch ms | torch/nanofast |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    from nanofast.ops import cpu
    cpu.ROUTES_ENABLED = False
    for isa in a.isas.split(","):
        _C.select_isa(isa)
        for dname in a.dtypes.split(","):
            dtype = getattr(torch, dname)
            for name, ours, theirs in cases(dtype):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                    once = seconds(ours, 1) + seconds(theirs, 1)  # warm both, then size the rounds
                    reps = max(1, min(200, int(0.05 / max(once / 2, 1e-6))))
                    t_ours, t_theirs = [], []
                    for _ in range(a.rounds):
                        t_ours.append(seconds(ours, reps))
                        t_theirs.append(seconds(theirs, reps))
                m_ours, m_theirs = statistics.median(t_ours) * 1e3, statistics.median(t_theirs) * 1e3
                line = f"| {isa} | {dname} | {name} | {m_ours:.4g} | {m_theirs:.4g} | {m_theirs / m_ours:.2f}x |"
                lines.append(line)
                print(line, flush=True)
    _C.select_isa("auto")
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
