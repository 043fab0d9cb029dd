"""The Triton kernels of current models' layers (nanofast.kernels: RMSNorm and add + RMSNorm, ...), held
to the parity rule of nanofast.testing. Without a GPU they run on CPU tensors under Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at small shapes."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'nanofast[test]')")

import nanofast.kernels as K  # noqa: E402
from nanofast.ops import cpu  # noqa: E402
from nanofast.testing import ATOL, ATOL_TRITON_GPU, assert_parity  # noqa: E402

from test_ops_rms_norm import VARIANTS, _model_rms_norm  # noqa: E402
from test_ops_rotary import cos_sin, hf_apply_rotary_pos_emb  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SLACK = ATOL_TRITON_GPU if HAS_CUDA else ATOL
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
EPS = 1e-6


def _slack(o, ref):
    """The parity rule's slack for a Triton result o. Triton's interpreter rounds float32 to 16 bits
    toward zero where a GPU rounds to nearest: half an ulp more of the largest value."""
    if HAS_CUDA or o.dtype not in (BF16, torch.float16):
        return SLACK
    return SLACK[o.dtype] + ref.abs().max().item() * (2.0 ** -8 if o.dtype == BF16 else 2.0 ** -11)


def _rnd(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale + shift


# ==================================================================================================
# RMSNorm and add + RMSNorm
# ==================================================================================================

RMS_SHAPES = [(37, 24), (5, 100), (3, 7), (1, 1), (18, 130)] if not HAS_CUDA else \
    [(4096, 576), (333, 1536), (64, 10000), (7, 1), (1, 65)]


def _rms_launchers(x, r, w, dh, dy, offset, cast, out_dtype, **kw):
    """h, y and the gradients of x, the residual and the weight, through the Triton launchers."""
    h, y, rstd = K.rms_norm_forward(x, r, w, EPS, offset, cast, out_dtype, **kw)
    rows = x if r is None else h
    dx, dres, dw = K.rms_norm_backward(dy, dh if r is not None else None, rows, w, rstd, offset, cast,
                                       None if r is None else r.dtype, w is not None, **kw)
    if r is not None and r.dtype == x.dtype:
        dres = dx
    return [t for t in (h if r is not None else None, y, dx, dres if r is not None else None,
                        dw if w is not None else None) if t is not None]


def _rms_torch(x, r, w, dh, dy, offset, cast, out_dtype):
    """The same through torch's autograd of the models' code (x + residual, then the norm)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w)]
    h = leaves[0] if r is None else leaves[0] + leaves[1]
    y = _model_rms_norm(h, leaves[2], EPS, offset, cast).to(out_dtype)
    torch.autograd.backward([y] if r is None else [h, y], [dy] if r is None else [dh, dy])
    grads = [t.grad for t in leaves if t is not None]
    return ([] if r is None else [h.detach()]) + [y.detach()] + grads


def _rms_check(N, C, dtypes, variant, residual, affine=True, seed=0, **kw):
    xd, rd, yd = dtypes
    offset, cast = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    x, r = _rnd(g, N, C, scale=2, shift=0.5), _rnd(g, N, C)
    w = _rnd(g, C, scale=0.5, shift=1) if affine else None
    dh, dy = _rnd(g, N, C), _rnd(g, N, C)
    r = r if residual else None
    dev = lambda t, dt: None if t is None else t.to(DEVICE, dt)  # noqa: E731
    args = [dev(x, xd), dev(r, rd), dev(w, xd), dev(dh, xd), dev(dy, yd)]
    ours = _rms_launchers(*args, offset, cast, yd, **kw)
    theirs = _rms_torch(*args, offset, cast, yd)
    ref = _rms_torch(*(None if t is None else t.double() for t in args), offset, cast, F64)
    names = (["h"] if residual else []) + ["y", "dx"] + (["dresidual"] if residual else []) + (["dweight"] if affine
                                                                                                 else [])
    assert len(ours) == len(theirs) == len(ref)
    for name, o, t, rr in zip(names, ours, theirs, ref):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_parity(f"rms_norm {variant} {name}", o, t, rr, _slack(o, rr))


@pytest.mark.parametrize("N,C", RMS_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_rms_norm_float32(N, C, variant, residual):
    _rms_check(N, C, (F32,) * 3, variant, residual)


@pytest.mark.parametrize("dtypes", [(BF16, BF16, BF16), (F32, BF16, BF16)] + ([(torch.float16,) * 3] if HAS_CUDA else []),
                         ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("variant", VARIANTS)
def test_rms_norm_half(dtypes, variant):
    N, C = RMS_SHAPES[1]
    _rms_check(N, C, dtypes, variant, residual=True)
    if dtypes[0] == dtypes[1]:
        _rms_check(N, C, dtypes, variant, residual=False)


def test_rms_norm_without_weight_and_wide_path():
    N, C = (300, 700) if HAS_CUDA else (40, 100)
    _rms_check(N, C, (F32,) * 3, "torch", residual=False, affine=False)
    for kw in (dict(block_n=32, block_m=4), dict(block_n=16, num_groups=3), dict(num_groups=1)):
        fwd = {k: v for k, v in kw.items() if k != "num_groups"}
        bwd = kw
        g = torch.Generator().manual_seed(3)
        x, r, w, dh, dy = (_rnd(g, *s).float().to(DEVICE) for s in ((N, C), (N, C), (C,), (N, C), (N, C)))
        base = K.rms_norm_forward(x, r, w, EPS, 0.0, True)
        other = K.rms_norm_forward(x, r, w, EPS, 0.0, True, **fwd)
        for a, c in zip(base, other):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        h, _, rstd = base
        ref = K.rms_norm_backward(dy, dh, h, w, rstd, 0.0, True, F32, True)
        got = K.rms_norm_backward(dy, dh, h, w, rstd, 0.0, True, F32, True, **bwd)
        for a, c in zip(ref, got):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_rms_norm_backward_deterministic():
    N, C = (2048, 576) if HAS_CUDA else (64, 40)
    g = torch.Generator().manual_seed(4)
    x, w, dy = (_rnd(g, *s).float().to(DEVICE) for s in ((N, C), (C,), (N, C)))
    _, _, rstd = K.rms_norm_forward(x, None, w, EPS)
    r1 = K.rms_norm_backward(dy, None, x, w, rstd)
    r2 = K.rms_norm_backward(dy, None, x, w, rstd)
    for a, c in zip(r1, r2):
        assert torch.equal(a, c)


def test_rms_norm_autograd_strided_3d_and_multi_dim_shape():
    B, T, C = (3, 50, 96) if HAS_CUDA else (2, 5, 24)
    g = torch.Generator().manual_seed(1)
    big = torch.randn(B, T, 2 * C, generator=g).to(DEVICE)
    x = big[..., :C].requires_grad_()  # rows strided by 2C: read in place
    w = torch.randn(C, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(B, T, C, generator=g).to(DEVICE)
    y = K.rms_norm(x, (C,), w, EPS, cast_before_weight=True)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = _model_rms_norm(xr, wr, EPS, 0.0, True)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.double())
    for name, a, r in (("y", y, yr), ("dx", dx, dxr), ("dw", dw, dwr)):
        assert (a.double() - r).abs().max().item() < 1e-4, name
    w2 = torch.randn(T, C, generator=g).to(DEVICE)
    torch.testing.assert_close(K.rms_norm(x, (T, C), w2), torch.nn.functional.rms_norm(x, (T, C), w2))


def test_rms_norm_agrees_with_the_cpu_kernels():
    if HAS_CUDA:
        pytest.skip("compares CPU tensors through both backends")
    g = torch.Generator().manual_seed(5)
    x, r, w, dh, dy = (_rnd(g, *s).float() for s in ((37, 100), (37, 100), (100,), (37, 100), (37, 100)))
    tri = _rms_launchers(x, r, w, dh, dy, 1.0, True, F32)
    ours = cpu.rms_norm_forward(x, r, w, EPS, 1.0, True, F32)
    dx, _, dw = cpu.rms_norm_backward(dy, dh, ours[0], w, ours[2], 1.0, True, F32, True)
    for name, a, c in zip(("h", "y", "dx", "dw"), tri[:3] + tri[4:], (ours[0], ours[1], dx, dw)):
        torch.testing.assert_close(a, c, rtol=2e-5, atol=2e-5, msg=name)


def test_rms_norm_bad_inputs():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="normalized_shape"):
        K.rms_norm(x, (7,))
    with pytest.raises(ValueError, match="weight"):
        K.rms_norm(x, (8,), torch.ones(7, device=DEVICE))
    with pytest.raises(TypeError, match="float32"):
        K.rms_norm(x.double(), (8,))
    with pytest.raises(ValueError, match="unit stride"):
        K.rms_norm_forward(x.t(), None, None, EPS)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 7\)"):
        K.rms_norm_forward(x, torch.randn(4, 7, device=DEVICE), None, EPS)
    with pytest.raises(ValueError, match="rstd must be"):
        K.rms_norm_backward(x, None, x, None, torch.ones(3, device=DEVICE))


# ==================================================================================================
# The gated MLP's activations (SwiGLU, GEGLU)
# ==================================================================================================

GLU_SHAPES = [(37, 24), (5, 100), (3, 7), (1, 1), (9, 130)] if not HAS_CUDA else \
    [(4096, 1536), (333, 2816), (7, 1), (1, 65)]
GLUS = {"silu": lambda g, u: torch.nn.functional.silu(g) * u,
        "gelu": lambda g, u: torch.nn.functional.gelu(g) * u,
        "gelu_tanh": lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u}


def _glu_torch(act, gate, up, dy):
    gate, up = (t.detach().clone().requires_grad_() for t in (gate, up))
    y = GLUS[act](gate, up)
    return [y.detach()] + list(torch.autograd.grad(y, (gate, up), dy))


def _glu_check(act, gate, up, dy):
    ours = [K.glu_forward(gate, up, act)] + list(K.glu_backward(dy, gate, up, act))
    theirs = _glu_torch(act, gate, up, dy)
    ref = _glu_torch(act, gate.double(), up.double(), dy.double())
    for name, o, t, r in zip(("y", "dgate", "dup"), ours, theirs, ref):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_parity(f"{act} {name}", o, t, r, _slack(o, r))


@pytest.mark.parametrize("N,C", GLU_SHAPES)
@pytest.mark.parametrize("act", GLUS)
@pytest.mark.parametrize("dtype", [F32, BF16] + ([torch.float16] if HAS_CUDA else []))
def test_glu(N, C, act, dtype):
    g = torch.Generator().manual_seed(N * C)
    gate, up, dy = ((_rnd(g, N, C) * s).to(DEVICE, dtype) for s in (3, 1, 1))
    _glu_check(act, gate, up, dy)


def test_glu_halves_of_one_projection_and_autograd():
    N, C = (512, 1536) if HAS_CUDA else (6, 40)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, N, 2 * C, generator=g).to(DEVICE).requires_grad_()
    gate, up = x.chunk(2, dim=-1)  # row stride 2C, read in place
    dy = torch.randn(2, N, C, generator=g).to(DEVICE)
    _glu_check("silu", gate.detach(), up.detach(), dy)
    y = K.swiglu(gate, up) + K.geglu(gate, up, approximate="tanh")
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_()
    gr, ur = xr.chunk(2, dim=-1)
    yr = GLUS["silu"](gr, ur) + GLUS["gelu_tanh"](gr, ur)
    (dxr,) = torch.autograd.grad(yr, xr, dy.double())
    assert (y.double() - yr).abs().max().item() < 1e-4 and (dx.double() - dxr).abs().max().item() < 1e-4


def test_glu_agrees_with_the_cpu_kernels():
    if HAS_CUDA:
        pytest.skip("compares CPU tensors through both backends")
    g = torch.Generator().manual_seed(6)
    gate, up, dy = (_rnd(g, 9, 70).float() * s for s in (3, 1, 1))
    for act in GLUS:
        tri = [K.glu_forward(gate, up, act), *K.glu_backward(dy, gate, up, act)]
        ours = [cpu.glu_forward(gate, up, act), *cpu.glu_backward(dy, gate, up, act)]
        for a, c in zip(tri, ours):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=act)


def test_glu_bad_inputs():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="activation must be"):
        K.glu_forward(x, x, "relu")
    with pytest.raises(ValueError, match=r"up has shape \(4, 7\)"):
        K.glu_forward(x, x[:, :7], "silu")
    with pytest.raises(ValueError, match="unit stride"):
        K.glu_forward(x.t(), x.t(), "silu")
    with pytest.raises(TypeError, match="float32"):
        K.swiglu(x.double(), x.double())


# ==================================================================================================
# The rotary position embedding
# ==================================================================================================

ROPE_CASES = [(2, 4, 2, 7, 16), (1, 3, 3, 5, 8), (1, 2, 1, 1, 2), (2, 2, 1, 9, 40)] if not HAS_CUDA else \
    [(4, 32, 8, 512, 128), (2, 9, 3, 257, 64), (1, 2, 1, 1, 2), (3, 12, 12, 333, 80)]


def _rope_run(fn, q, k, cos, sin, dq, dk, **kw):
    q, k = (t.detach().clone().requires_grad_() for t in (q, k))
    qe, ke = fn(q, k, cos, sin, **kw)
    torch.autograd.backward([qe, ke], [dq.to(qe.dtype), dk.to(ke.dtype)])
    return qe.detach(), ke.detach(), q.grad, k.grad


def _rope_check(B, H, Hk, T, D, dtype, cos_dtype, interleaved, R=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = _rnd(g, B, T, H, D).to(DEVICE, dtype).transpose(1, 2)  # the models' layout
    k = _rnd(g, B, Hk, T, D).to(DEVICE, dtype)
    dq, dk = _rnd(g, *q.shape).to(DEVICE), _rnd(g, *k.shape).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in cos_sin(B, T, R or D, cos_dtype, interleaved))
    kw = dict(interleaved=interleaved)
    ours = _rope_run(K.apply_rotary_pos_emb, q, k, cos, sin, dq, dk, **kw)
    theirs = _rope_run(hf_apply_rotary_pos_emb, q, k, cos, sin, dq, dk, **kw)
    ref = _rope_run(hf_apply_rotary_pos_emb, *(t.double() for t in (q, k, cos, sin, dq, dk)), **kw)
    for name, o, t, r in zip(("q_embed", "k_embed", "dq", "dk"), ours, theirs, ref):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_parity(f"rotary {name}", o, t, r, _slack(o, r))
    assert ours[0].stride() == q.stride()  # q's (B, T, H, D) memory kept


@pytest.mark.parametrize("B,H,Hk,T,D", ROPE_CASES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_rotary_float32(B, H, Hk, T, D, interleaved):
    _rope_check(B, H, Hk, T, D, F32, F32, interleaved)


@pytest.mark.parametrize("dtypes", [(BF16, BF16), (BF16, F32)] + ([(torch.float16, torch.float16)] if HAS_CUDA else []),
                         ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_rotary_half(dtypes, interleaved):
    _rope_check(*ROPE_CASES[0], *dtypes, interleaved)


def test_rotary_partial_and_agrees_with_the_cpu_kernels():
    _rope_check(*ROPE_CASES[-1], F32, F32, False, R=16)
    _rope_check(*ROPE_CASES[-1], F32, F32, True, R=16)
    if HAS_CUDA:
        return
    g = torch.Generator().manual_seed(7)
    q, k = _rnd(g, 2, 3, 5, 12).float(), _rnd(g, 2, 1, 5, 12).float()
    cos, sin = (t.unsqueeze(1) for t in cos_sin(2, 5, 8, F32))
    for interleaved in (False, True):
        tri = K.rotary_forward(q, k, cos, sin, interleaved) + K.rotary_backward(q, None, cos, sin, interleaved)
        ours = cpu.rotary_forward(q, k, cos, sin, interleaved) + cpu.rotary_backward(q, None, cos, sin, interleaved,
                                                                                     F32)
        for a, c in zip(tri, ours):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_rotary_bad_inputs():
    q = torch.randn(2, 4, 5, 8, device=DEVICE)
    cos = torch.randn(2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="even last dim"):
        K.apply_rotary_pos_emb(q, q, cos[..., :7], cos[..., :7])
    with pytest.raises(TypeError, match="float32"):
        K.apply_rotary_pos_emb(q.double(), q.double(), cos.double(), cos.double())
    qt = torch.randn(2, 4, 8, 5, device=DEVICE).transpose(2, 3)  # (2, 4, 5, 8), a strided last dim
    with pytest.raises(ValueError, match="unit stride"):
        K.rotary_forward(qt, qt, cos[:, None], cos[:, None])
    with pytest.raises(ValueError, match=r"q and k must be tensors \(one may be None\), got NoneType and NoneType"):
        K.rotary_backward(None, None, cos, cos)
    with pytest.raises(ValueError, match="q and k must be tensors, got Tensor and NoneType"):
        K.rotary_forward(q, None, cos[:, None], cos[:, None])


# ==================================================================================================
# Compiled for a GPU without one
# ==================================================================================================

_AOT_SCRIPT = r'''
import importlib.util, os, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("kx", os.path.join(root, "__init__.py"), submodule_search_locations=[root])
m = importlib.util.module_from_spec(spec); sys.modules["kx"] = m; spec.loader.exec_module(m)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import kx.rmsnorm as RN, kx.glu as GL, kx.rope as RP
target = GPUTarget("cuda", 90, 32)

def compile_(fn, types, constexprs, num_warps=4, f32_ptrs=("Rstd", "DW_PART")):
    """types: the dtype of each pointer argument by name, f32_ptrs the float32 ones; the others are
    integers, or floats by their names."""
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in ("eps", "weight_offset"):
            sig[n] = "fp32"
        elif n in types or n in f32_ptrs:
            sig[n] = "*" + types.get(n, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "i32"
    triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=dict(num_warps=num_warps))
    print("compiled", fn.__name__, types, constexprs, flush=True)

for x, y in (("bf16", "bf16"), ("fp32", "bf16"), ("fp16", "fp16")):
    io = dict(X=x, R=y, W=x, H=x, Y=y, DY=y, DH=x, DX=x, DRES=y)
    for one, bn, bm in ((True, 1024, 4), (False, 2048, 2)):
        flags = dict(HAS_W=True, CAST=True, BLOCK_M=bm, BLOCK_N=bn, ONE_BLOCK=one)
        compile_(RN._rms_norm_fwd_kernel, io, dict(flags, HAS_RES=True), 8)
        compile_(RN._rms_norm_bwd_kernel, io, dict(flags, HAS_DH=True, HAS_DRES=True, NEED_DW=True), 8)
    for act in (0, 1, 2):
        for backward in (False, True):
            compile_(GL._glu_kernel, dict(G=x, U=x, DY=x, OUT=x, DUP=x),
                     dict(ACT=act, BACKWARD=backward, BLOCK_M=16, BLOCK_N=128))
    for interleaved in (False, True):
        for backward in (False, True):
            compile_(RP._rope_kernel, dict(Q=x, OQ=y, K=x, OK=y, COS="fp32" if y == "fp32" else x,
                                           SIN="fp32" if y == "fp32" else x),
                     dict(INTERLEAVED=interleaved, BACKWARD=backward, BLOCK_M=16, BLOCK_H=64, BLOCK_P=16))
print("all compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Compile this file's kernels for an H100 (sm_90) without a GPU: what the interpreter lets through
    (the compiler's type rules, unsupported ops), for 16-bit and mixed dtypes and every flag."""
    import importlib.util
    import os
    import pathlib
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kernels = pathlib.Path(__file__).resolve().parents[1] / "kernels"
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(kernels)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0 and "all compiled" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
