"""Tests of the Triton kernels (nanofast.kernels).

Without a GPU they run on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton), at small shapes. With CUDA the same tests run
natively at larger shapes, plus float16/bfloat16 checks against torch's own kernels.

Accuracy follows the flash-attention rule of nanofast.testing: against a float64 reference, our error
may be at most twice torch's error in the same dtype, plus a small absolute slack:
    max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + atol.
"""
import importlib
import importlib.util
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (pip install 'nanofast[test]')")

from philox_ref import dropout_mask_ref, uniform  # noqa: E402  (tests/ is on sys.path via conftest)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
_REPO = pathlib.Path(__file__).resolve().parents[1]


import nanofast.kernels as K  # noqa: E402  (the installed package: a missing kernels/ in the wheel fails here)
from nanofast.testing import ATOL, ATOL_TRITON_GPU, assert_parity, attention_reference  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLACK = ATOL_TRITON_GPU if HAS_CUDA else ATOL  # the parity rule's slack (nanofast.testing)


# ==================================================================================================
# LayerNorm
# ==================================================================================================

if HAS_CUDA:
    LN_SHAPES = [(4096, 384), (333, 1536), (64, 10000), (7, 1), (1, 65)]
else:
    LN_SHAPES = [(37, 24), (5, 100), (3, 7), (1, 1), (18, 130)]  # 100, 130 > 64: the wide-row loop


def _ln_inputs(N, C, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    w = (torch.randn(C, generator=g, dtype=torch.float64) + 1).to(dtype) if affine in ("wb", "w") else None
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype) if affine in ("wb", "b") else None
    dy = torch.randn(N, C, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def _ln_run(fn, x, w, b, dy, shape):
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_() if w is not None else None
    bs = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(xs, shape, ws, bs, 1e-5)
    y.backward(dy)
    return y.detach(), xs.grad, ws.grad if ws is not None else None, bs.grad if bs is not None else None


def _ln_check(x, w, b, dy, shape, dtype):
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    d64 = lambda t: t.to(DEVICE, torch.float64) if t is not None else None  # noqa: E731
    ref = _ln_run(F.layer_norm, d64(x), d64(w), d64(b), d64(dy), shape)
    same = _ln_run(F.layer_norm, dev(x), dev(w), dev(b), dev(dy), shape)
    ours = _ln_run(K.layer_norm, dev(x), dev(w), dev(b), dev(dy), shape)
    for name, o, s, r in zip(("y", "dx", "dw", "db"), ours, same, ref):
        if r is None:
            assert o is None
            continue
        assert o.dtype == s.dtype and o.shape == s.shape, name
        assert_parity(f"layer_norm {name}", o, s, r, SLACK)


@pytest.mark.parametrize("N,C", LN_SHAPES)
@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
def test_layer_norm_float32(N, C, affine):
    x, w, b, dy = _ln_inputs(N, C, torch.float32, affine)
    _ln_check(x, w, b, dy, (C,), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,C", LN_SHAPES[:2])
def test_layer_norm_half(N, C, dtype):
    x, w, b, dy = _ln_inputs(N, C, dtype, "wb")
    _ln_check(x, w, b, dy, (C,), dtype)


def test_layer_norm_strided_3d_and_multi_dim_shape():
    B, T, C = (3, 50, 96) if HAS_CUDA else (2, 5, 24)
    g = torch.Generator().manual_seed(1)
    big = torch.randn(B, T, 2 * C, generator=g)
    x = big[..., :C]  # rows strided by 2C, unit column stride: read in place
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    dy = torch.randn(B, T, C, generator=g)
    _ln_check(x, w, b, dy, (C,), torch.float32)
    # Non-unit column stride (copied), and normalising over the last two dimensions.
    xt = torch.randn(B, C, T, generator=g).transpose(1, 2)
    _ln_check(xt, None, b, dy, (C,), torch.float32)
    w2 = torch.randn(T, C, generator=g)
    _ln_check(x, w2, None, dy, (T, C), torch.float32)


def test_layer_norm_launchers_wide_path_and_groups():
    N, C = (300, 700) if HAS_CUDA else (40, 100)
    x, w, b, dy = _ln_inputs(N, C, torch.float32, "wb", seed=3)
    x, w, b, dy = (t.to(DEVICE) for t in (x, w, b, dy))
    base = K.layer_norm_forward(x, w, b, 1e-5)
    wide = K.layer_norm_forward(x, w, b, 1e-5, block_n=32, block_m=4)
    for a, c in zip(base, wide):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    y, mean, rstd = base
    assert y.shape == (N, C) and y.is_contiguous()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (N,)
    torch.testing.assert_close(mean, x.double().mean(1).float())
    torch.testing.assert_close(rstd, (x.double().var(1, unbiased=False) + 1e-5).rsqrt().float())
    ref = K.layer_norm_backward(dy, x, w, mean, rstd, True, True)
    for kw in (dict(block_n=32, num_groups=3), dict(num_groups=1), dict(block_m=2, num_groups=7)):
        got = K.layer_norm_backward(dy, x, w, mean, rstd, True, True, **kw)
        for a, c in zip(ref, got):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    dx, dw, db = K.layer_norm_backward(dy, x, w, mean, rstd, False, False)
    assert dw is None and db is None
    dx, dw, db = K.layer_norm_backward(dy, x, None, mean, rstd, True, True)
    assert dw is None and db is not None


@pytest.mark.parametrize("wide", [False, True])
def test_layer_norm_backward_deterministic(wide):
    N, C = (2048, 384) if HAS_CUDA else (64, 40)
    x, w, b, dy = _ln_inputs(N, C, torch.float32, "wb", seed=4)
    x, w, b, dy = (t.to(DEVICE) for t in (x, w, b, dy))
    kw = dict(block_n=16) if wide else {}
    _, mean, rstd = K.layer_norm_forward(x, w, b, 1e-5, **kw)
    r1 = K.layer_norm_backward(dy, x, w, mean, rstd, True, True, **kw)
    r2 = K.layer_norm_backward(dy, x, w, mean, rstd, True, True, **kw)
    for a, c in zip(r1, r2):
        assert torch.equal(a, c)


def test_layer_norm_mixed_dtypes():
    """bfloat16 activations with float32 parameters (mixed precision): y and dx follow the input,
    dw and db the parameters."""
    N, C = (512, 384) if HAS_CUDA else (9, 24)
    x, w, b, dy = _ln_inputs(N, C, torch.float64, "wb", seed=2)
    xs = x.to(DEVICE, torch.bfloat16).requires_grad_()
    ws, bs = (t.to(DEVICE, torch.float32).requires_grad_() for t in (w, b))
    y = K.layer_norm(xs, (C,), ws, bs)
    y.backward(dy.to(DEVICE, torch.bfloat16))
    assert y.dtype == xs.grad.dtype == torch.bfloat16 and ws.grad.dtype == bs.grad.dtype == torch.float32
    ref = _ln_run(F.layer_norm, xs.detach().double(), ws.detach().double(), bs.detach().double(),
                  dy.to(DEVICE, torch.bfloat16).double(), (C,))
    for name, o, r, tol in zip(("y", "dx", "dw", "db"), (y, xs.grad, ws.grad, bs.grad), ref, (3e-2, 3e-2, 1e-4, 1e-4)):
        scale = r.abs().max().item() + 1.0
        assert (o.double() - r).abs().max().item() <= tol * scale, name


def test_layer_norm_strided_parameters():
    # weight and bias views with a stride: the launchers pack them instead of reading them densely
    x = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(48, device=DEVICE)[::2].requires_grad_()
    b = torch.randn(24, 2, device=DEVICE)[:, 1]
    dy = torch.randn(6, 24, device=DEVICE)
    y = K.layer_norm(x, (24,), w, b)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = torch.nn.functional.layer_norm(xr, (24,), wr, b.double())
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.double())
    for name, a, r in (("y", y, yr), ("dx", dx, dxr), ("dw", dw, dwr)):
        assert (a.double() - r).abs().max().item() < 1e-4, name


def test_layer_norm_bad_inputs():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="normalized_shape"):
        K.layer_norm(x, (7,))
    with pytest.raises(ValueError, match="weight"):
        K.layer_norm(x, (8,), torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        K.layer_norm(x, (8,), None, torch.ones(4, 2, device=DEVICE))
    with pytest.raises(TypeError, match="float32"):
        K.layer_norm(x.double(), (8,))
    with pytest.raises(ValueError, match="2-D"):
        K.layer_norm_forward(x[None], None, None, 1e-5)
    with pytest.raises(ValueError, match="unit stride"):
        K.layer_norm_forward(x.t(), None, None, 1e-5)


# ==================================================================================================
# Attention
# ==================================================================================================

if HAS_CUDA:
    # Few distinct (head_dim, causal) pairs: each is a fresh compilation of three kernels.
    ATTN_CASES = [  # B, H, Tq, Tk, D, causal
        (2, 3, 257, 257, 64, True), (2, 3, 257, 257, 64, False), (1, 2, 1000, 513, 128, False),
        (1, 2, 513, 1000, 128, True), (2, 2, 384, 128, 80, True), (1, 1, 1, 1, 64, True),
        (2, 6, 256, 256, 64, True), (1, 2, 97, 203, 40, False),
    ]
else:
    ATTN_CASES = [
        (1, 2, 17, 17, 16, True), (1, 2, 17, 17, 16, False), (2, 2, 33, 33, 40, True),
        (1, 2, 7, 33, 24, False), (1, 2, 33, 7, 24, True), (1, 2, 33, 17, 40, False),
        (1, 2, 1, 1, 16, True), (2, 2, 1, 17, 24, False), (1, 2, 17, 1, 16, True),
    ]


def _qkv(B, H, Tq, Tk, D, seed=0):
    """float64 q, k, v and an output gradient, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Tk, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    return q, k, v, do


def _run_attn(fn, q, k, v, do, dtype, **kw):
    """Forward + backward of fn on copies of q, k, v cast to dtype on DEVICE (layout kept)."""
    leaves = []
    for t in (q, k, v):
        leaf = t.to(DEVICE, dtype).detach().requires_grad_()
        leaves.append(leaf)
    out = fn(*leaves, **kw)
    out.backward(do.to(DEVICE, dtype))
    return (out.detach(),) + tuple(t.grad for t in leaves)


def _attn_check(q, k, v, do, dtype, causal, scale=None, layout="contiguous"):
    D = q.shape[-1]
    sc = scale if scale is not None else 1.0 / math.sqrt(D)

    def run(fn, dt):
        if layout == "packed":
            # nanoGPT's layout: one (B, T, 3*H*D) projection split into q, k, v and each viewed as
            # (B, T, H, D).transpose(1, 2): strided, non-contiguous views of a shared buffer.
            B, H, T, D_ = q.shape
            packed = torch.cat([t.transpose(1, 2).reshape(B, T, H * D_) for t in (q, k, v)], dim=2)
            packed = packed.to(DEVICE, dt).requires_grad_()
            views = [t.view(B, T, H, D_).transpose(1, 2) for t in packed.split(H * D_, dim=2)]
            assert not views[0].is_contiguous()
            out = fn(*views)
            out.backward(do.to(DEVICE, dt))
            grads = [t.view(B, T, H, D_).transpose(1, 2) for t in packed.grad.split(H * D_, dim=2)]
            return (out.detach(), *grads)
        leaves = [t.to(DEVICE, dt).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(do.to(DEVICE, dt))
        return (out.detach(),) + tuple(t.grad for t in leaves)

    ref = run(lambda a, b, c: attention_reference(a, b, c, causal, sc), torch.float64)
    same = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal, scale=scale), dtype)
    ours = run(lambda a, b, c: K.scaled_dot_product_attention(a, b, c, is_causal=causal, scale=scale), dtype)
    for name, o, s, r in zip(("out", "dq", "dk", "dv"), ours, same, ref):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), name
        assert_parity(f"attention {name}", o, s, r, SLACK)
    return ours


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", ATTN_CASES)
def test_attention_float32(B, H, Tq, Tk, D, causal):
    q, k, v, do = _qkv(B, H, Tq, Tk, D)
    out = _attn_check(q, k, v, do, torch.float32, causal)[0]
    # (B, T, H, D) memory order behind a (B, H, T, D) view, like the CPU kernels.
    assert out.transpose(1, 2).is_contiguous()


def test_attention_one_query_row_against_a_cache_view():
    """Sampling's decode step on CUDA: one query row against the first L positions of a key/value
    cache's preallocated (B, H, capacity, D) buffers (head stride capacity * D), not causal."""
    B, H, cap, D, L = (2, 12, 1024, 64, 700) if HAS_CUDA else (2, 2, 24, 16, 13)
    g = torch.Generator().manual_seed(12)
    k_buf = torch.randn(B, H, cap, D, generator=g).to(DEVICE)
    v_buf = torch.randn(B, H, cap, D, generator=g).to(DEVICE)
    q = torch.randn(B, 1, H, D, generator=g).to(DEVICE).transpose(1, 2)
    k, v = k_buf[:, :, :L], v_buf[:, :, :L]
    # (bfloat16 on the GPU only: the kernel rounds P to bfloat16 for its P V dot, which with a single
    # query row can exceed twice torch's error by more than the interpreter's slack)
    for dtype in (torch.float32, torch.bfloat16) if HAS_CUDA else (torch.float32,):
        qd, kd, vd = (t.to(dtype) for t in (q, k, v))
        ours = K.scaled_dot_product_attention(qd, kd, vd)
        ref = attention_reference(qd.double(), kd.double(), vd.double())
        assert_parity("out", ours, F.scaled_dot_product_attention(qd, kd, vd), ref, SLACK)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_strided_views_and_scale(causal):
    B, H, T, D = (2, 6, 200, 64) if HAS_CUDA else (1, 2, 17, 24)
    q, k, v, do = _qkv(B, H, T, T, D, seed=5)
    _attn_check(q, k, v, do, torch.float32, causal, scale=0.3, layout="packed")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_half(dtype, causal):
    B, H, Tq, Tk, D = (2, 4, 300, 300, 128) if HAS_CUDA else (1, 2, 33, 17, 40)
    q, k, v, do = _qkv(B, H, Tq, Tk, D, seed=6)
    _attn_check(q, k, v, do, dtype, causal)


@pytest.mark.skipif(not HAS_CUDA, reason="tolerance checks at GPU shapes need CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(1024, 64), (777, 128), (129, 80)])
def test_attention_half_cuda_large(dtype, T, D):
    q, k, v, do = _qkv(2, 4, T, T, D, seed=7)
    _attn_check(q, k, v, do, dtype, True, layout="packed")


@pytest.mark.skipif(HAS_CUDA, reason="checks the kernels' NaN handling on CPU tensors, under the interpreter")
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max of a NaN row
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_nan_propagates(which, causal):
    from test_ops_attention import check_nan_propagates
    for T, row in ((8, 3), (40, 20)):
        check_nan_propagates(K.scaled_dot_product_attention, which, causal, torch.float32, T, row)


def test_attention_tf32_opt_in(monkeypatch):
    B, H, T, D = (2, 2, 256, 64) if HAS_CUDA else (1, 2, 17, 16)
    q, k, v, _ = _qkv(B, H, T, T, D, seed=8)
    q, k, v = (t.to(DEVICE, torch.float32) for t in (q, k, v))
    ref = attention_reference(q.double(), k.double(), v.double(), True, 0.25)
    out, _ = K.attention_forward(q, k, v, True, 0.25, tf32=True)
    assert (out.double() - ref.to(out.device)).abs().max().item() < 2e-2  # TF32: 10-bit mantissa
    monkeypatch.setenv("NANOFAST_TF32", "1")
    out2, _ = K.attention_forward(q, k, v, True, 0.25)
    assert torch.equal(out, out2)


def test_attention_lse():
    B, H, Tq, Tk, D = (2, 3, 300, 200, 64) if HAS_CUDA else (1, 2, 17, 33, 16)
    q, k, v, _ = _qkv(B, H, Tq, Tk, D, seed=9)
    for causal in (True, False):
        out, lse = K.attention_forward(*(t.to(DEVICE, torch.float32) for t in (q, k, v)), causal, 0.5)
        s = (q @ k.transpose(-1, -2)) * 0.5
        if causal:
            s = s.masked_fill(~torch.ones(Tq, Tk, dtype=torch.bool).tril(), float("-inf"))
        assert lse.dtype == torch.float32 and lse.shape == (B, H, Tq) and lse.is_contiguous()
        torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------

SEEDS = [0, 1234, 2 ** 31 + 17, 2 ** 40 + 123, 2 ** 62 + 5, 2 ** 63 + 3, 2 ** 64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_dropout_mask_kernel_matches_reference(seed):
    B, H, Tq, Tk = (2, 3, 100, 257) if HAS_CUDA else (2, 2, 17, 33)
    for p in (0.1, 0.5):
        got = K.dropout_mask(seed, B, H, Tq, Tk, p, device=DEVICE).cpu().numpy()
        assert got.shape == (B, H, Tq, Tk)
        np.testing.assert_array_equal(got, dropout_mask_ref(seed, B, H, Tq, Tk, p))


def test_dropout_mask_offsets_past_2_32():
    """Offsets over 2**32 use the high counter word: check a window at the far end of a huge matrix."""
    seed, p, B, H, Tq, Tk = 2 ** 40 + 99, 0.25, 3, 4, 2 ** 18, 4096  # 1.3e10 elements
    window = (B * H - 2, Tq - 5, Tk - 40, 2, 5, 40)
    got = K.dropout_mask(seed, B, H, Tq, Tk, p, device=DEVICE, window=window).cpu().numpy()
    bh = np.arange(B * H - 2, B * H, dtype=np.uint64)[:, None, None]
    i = np.arange(Tq - 5, Tq, dtype=np.uint64)[None, :, None]
    j = np.arange(Tk - 40, Tk, dtype=np.uint64)[None, None, :]
    offs = (bh * np.uint64(Tq) + i) * np.uint64(Tk) + j
    assert offs.max() > 2 ** 33
    np.testing.assert_array_equal(got, uniform(seed, offs) >= np.float32(p))


def _mask_through_attention(seed, B, H, Tq, Tk, p, is_causal=False):
    """Reveal the mask the attention kernel applies: with q = 0 every visible key gets the same
    probability, and V = identity copies each dropped-and-scaled P entry into the output."""
    D = max(16, Tk)
    q = torch.zeros(B, H, Tq, D, device=DEVICE)
    k = torch.randn(B, H, Tk, D, device=DEVICE)
    v = torch.eye(Tk, D, device=DEVICE).expand(B, H, Tk, D)
    out, _ = K.attention_forward(q, k, v, is_causal, 1.0, p, seed)
    return out[..., :Tk] > 0


@pytest.mark.parametrize("seed", [7, 2 ** 40 + 123, 2 ** 63 + 5])
def test_dropout_mask_inside_attention(seed):
    B, H, Tq, Tk = (2, 3, 200, 128) if HAS_CUDA else (2, 2, 17, 24)
    p = 0.3
    ref = torch.from_numpy(dropout_mask_ref(seed, B, H, Tq, Tk, p))
    assert torch.equal(_mask_through_attention(seed, B, H, Tq, Tk, p).cpu(), ref)
    causal = _mask_through_attention(seed, B, H, Tq, Tk, p, is_causal=True).cpu()
    assert torch.equal(causal, ref & torch.ones(Tq, Tk, dtype=torch.bool).tril())


def test_dropout_seed_from_torch_generator():
    """The user function draws torch.randint(0, 2**62, (1,)) from the generator of the tensors' device."""
    B, H, T, D = 1, 2, 16, 16
    q = torch.zeros(B, H, T, D, device=DEVICE)
    k = torch.randn(B, H, T, D, device=DEVICE)
    v = torch.eye(T, D, device=DEVICE).expand(B, H, T, D)
    torch.manual_seed(321)
    out1 = K.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(321)
    out2 = K.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    assert torch.equal(out1, out2)
    torch.manual_seed(321)
    seed = int(torch.randint(0, 2 ** 62, (1,), device=DEVICE).item())
    ref = torch.from_numpy(dropout_mask_ref(seed, B, H, T, T, 0.4))
    assert torch.equal(out1.cpu() > 0, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_dropout_gradients(causal, dtype):
    """Dropout through the launchers, float32 and bfloat16 (their own tiles on a GPU), against the
    float64 reference with the same mask."""
    B, H, Tq, Tk, D = (2, 3, 200, 300, 64) if HAS_CUDA else (1, 2, 33, 17, 16)
    p, seed, scale = 0.2, 2 ** 40 + 7, 0.25
    q, k, v, do = _qkv(B, H, Tq, Tk, D, seed=10)
    keep = torch.from_numpy(dropout_mask_ref(seed, B, H, Tq, Tk, p))
    ref = _run_attn(lambda a, b, c: attention_reference(a, b, c, causal, scale, keep, p), q, k, v, do, torch.float64)

    class Fn(torch.autograd.Function):  # the launchers with a fixed seed
        @staticmethod
        def forward(ctx, a, b, c):
            out, lse = K.attention_forward(a, b, c, causal, scale, p, seed)
            ctx.save_for_backward(a, b, c, out, lse)
            return out

        @staticmethod
        def backward(ctx, g):
            return K.attention_backward(g, *ctx.saved_tensors, causal, scale, p, seed)

    ours = _run_attn(Fn.apply, q, k, v, do, dtype)
    same = _run_attn(lambda a, b, c: attention_reference(a, b, c, causal, scale, keep, p), q, k, v, do, dtype)
    for name, o, s, r in zip(("out", "dq", "dk", "dv"), ours, same, ref):
        assert o.dtype == dtype, name
        assert_parity(f"dropout attention {name}", o, s, r.to(o.device), SLACK)


def test_dropout_p_one_gives_zeros():
    q, k, v, do = _qkv(1, 2, 17, 17, 16, seed=11)
    out, dq, dk, dv = _run_attn(lambda a, b, c: K.scaled_dot_product_attention(a, b, c, dropout_p=1.0),
                                q, k, v, do, torch.float32)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all() and not t.any()


# --------------------------------------------------------------------------------------------------
# Determinism, errors, import without triton
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_attention_backward_deterministic(dropout_p):
    B, H, T, D = (4, 6, 512, 64) if HAS_CUDA else (1, 2, 33, 16)
    q, k, v, do = (t.to(DEVICE, torch.float32) for t in _qkv(B, H, T, T, D, seed=12))
    out, lse = K.attention_forward(q, k, v, True, 0.125, dropout_p, 99)
    g1 = K.attention_backward(do, q, k, v, out, lse, True, 0.125, dropout_p, 99)
    g2 = K.attention_backward(do, q, k, v, out, lse, True, 0.125, dropout_p, 99)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    out2, lse2 = K.attention_forward(q, k, v, True, 0.125, dropout_p, 99)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    dq, dk, dv = K.attention_backward(do, q, k, v, out, lse, True, 0.125, dropout_p, 99, need_dq=False)
    assert dq is None and torch.equal(dk, g1[1]) and torch.equal(dv, g1[2])


def test_attention_bad_inputs():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    sdpa = K.scaled_dot_product_attention
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa(q, q, q, attn_mask=torch.ones(8, 9, dtype=torch.bool, device=DEVICE))  # does not broadcast
    with pytest.raises(ValueError, match="divide the query heads"):
        sdpa(torch.randn(1, 3, 8, 16, device=DEVICE), q, q, enable_gqa=True)
    with pytest.raises(ValueError, match="4-D"):
        sdpa(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="share a dtype"):
        sdpa(q, q.half(), q)
    with pytest.raises(TypeError, match="float32"):
        sdpa(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="head_dim"):
        sdpa(q, q[..., :8], q)
    with pytest.raises(ValueError, match="batch and heads"):
        sdpa(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="seq_len"):
        sdpa(q, q, q[:, :, :4])
    big = torch.randn(1, 1, 4, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim must be between"):
        sdpa(big, big, big)
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match="seed"):
        K.attention_forward(q, q, q, False, 1.0, 0.1, 2 ** 64)
    with pytest.raises(ValueError, match="lse"):
        K.attention_backward(q, q, q, q, q, torch.zeros(1, 2, 7, device=DEVICE), False, 1.0)


def test_attention_checks_are_the_ops_checks():
    """nanofast.kernels and nanofast.ops share their checks (nanofast.ops.checks): one exception type for
    what is not supported yet, and the backend's own limits with one message."""
    from nanofast import ops
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    learned = torch.zeros(8, 8, device=DEVICE, requires_grad=True)  # a mask that wants a gradient
    for sdpa in (K.scaled_dot_product_attention, ops.scaled_dot_product_attention):
        with pytest.raises(NotImplementedError) as e:
            sdpa(q, q, q, attn_mask=learned)
        assert isinstance(e.value, ValueError)
    # a value head size other than the query's: the CPU kernels take it, the Triton ones do not
    v = torch.randn(1, 2, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="value head_dim 8 must equal query head_dim 16 on nanofast's CUDA backend"):
        K.scaled_dot_product_attention(q, q, v)


# ---- attention masks, grouped-query heads and the sliding window ----

def _masked_check(B, H, Hkv, Tq, Tk, D, dtype, attn_mask=None, causal=False, window=None, seed=0, slack=SLACK):
    """The parity rule for out, dq, dk, dv with a mask, fewer key/value heads or a window (torch: one
    equivalent mask, as tests/test_ops_attention_masks.py builds it)."""
    from test_ops_attention_masks import _qkv as _qkv_heads, _torch_mask
    q, k, v, do = _qkv_heads(B, H, Hkv, Tq, Tk, D, torch.float64, seed)
    gqa = Hkv != H
    dev = lambda m: None if m is None else m.to(DEVICE)  # noqa: E731
    ref_mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    ref = _run_attn(lambda a, b, c: attention_reference(a, b, c, causal, None, attn_mask=dev(ref_mask), window=window),
                    q, k, v, do, torch.float64)
    torch_mask = dev(_torch_mask(attn_mask, causal, window, Tq, Tk))
    same = _run_attn(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, torch_mask, enable_gqa=gqa),
                     q, k, v, do, dtype)
    ours = _run_attn(lambda a, b, c: K.scaled_dot_product_attention(a, b, c, dev(attn_mask), is_causal=causal,
                                                                     enable_gqa=gqa, window=window), q, k, v, do, dtype)
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), ours, same, ref):
        assert o.shape == r.shape and torch.isfinite(o).all(), name
        assert_parity(f"masked attention {name}", o, t, r, slack)
    return ours


MASK_CASES = {  # name: (B, H, Hkv, Tq, Tk, D, mask builder, causal, window); masks built from (B, H, Tq, Tk)
    "padding_causal_gqa": (2, 4, 2, 33, 33, 16, lambda B, H, Tq, Tk: _pad_mask(B, Tk, [Tk, 10]), True, None),
    "padding_additive": (2, 2, 2, 17, 40, 24, lambda B, H, Tq, Tk: _pad_mask(B, Tk, [40, 3], torch.float32), False,
                         None),
    "full_additive_fully_masked_row": (1, 2, 1, 20, 35, 16, lambda B, H, Tq, Tk: _rand_mask((Tq, Tk), torch.float32),
                                       False, None),
    "bool_per_head_transposed": (2, 2, 2, 30, 30, 16, lambda B, H, Tq, Tk: _rand_mask((B, H, Tk, Tq)).transpose(2, 3),
                                 True, None),
    "window_mqa": (1, 4, 1, 40, 40, 16, None, True, 7),
    "window_rows_past_the_keys": (1, 2, 2, 50, 20, 16, None, True, 5),
    "window_and_padding": (2, 2, 1, 40, 40, 16, lambda B, H, Tq, Tk: _pad_mask(B, Tk, [40, 25]), True, 16),
}


def _pad_mask(B, Tk, lengths, dtype=torch.bool):
    from test_ops_attention_masks import _padding
    return _padding(B, Tk, lengths, dtype)


def _rand_mask(shape, dtype=torch.bool):
    from test_ops_attention_masks import _random_mask
    mask = _random_mask(shape, dtype)
    if dtype != torch.bool and len(shape) == 2:
        mask[3] = float("-inf")  # a query that sees no key: zeros, as torch gives
    return mask


@pytest.mark.parametrize("name", MASK_CASES)
def test_attention_masks_gqa_window(name):
    B, H, Hkv, Tq, Tk, D, build, causal, window = MASK_CASES[name]
    mask = None if build is None else build(B, H, Tq, Tk)
    _masked_check(B, H, Hkv, Tq, Tk, D, torch.float32, mask, causal, window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_masks_half(dtype):
    # bfloat16 with the GPU's slack even under the interpreter: the kernels round P and dS to bfloat16
    # for their dots there too, which torch's CPU kernels do not, and at these sizes the outputs' last
    # bits decide the rule (the unmasked path misses the plain slack for some seeds as well)
    slack = ATOL_TRITON_GPU if dtype == torch.bfloat16 else SLACK
    B, T = 2, 33
    _masked_check(B, 4, 2, T, T, 40, dtype, _pad_mask(B, T, [T, 12]), True, 20, slack=slack)
    _masked_check(B, 2, 2, T, T, 40, dtype, _rand_mask((T, T), dtype), slack=slack)  # additive, the inputs' dtype


def test_attention_masks_with_dropout_and_groups():
    # the same keep mask as without masks, for the same seed: nanofast.kernels.dropout_mask's
    B, H, Hkv, T, D, p, seed = 2, 4, 2, 24, 16, 0.3, 77
    from test_ops_attention_masks import _qkv as _qkv_heads
    q, k, v, do = (t.to(DEVICE, torch.float32) for t in _qkv_heads(B, H, Hkv, T, T, D, torch.float64))
    mask = _pad_mask(B, T, [T, 15]).to(DEVICE)
    out, lse = K.attention_forward(q, k, v, True, 0.25, p, seed, mask, 9)
    grads = K.attention_backward(do, q, k, v, out, lse, True, 0.25, p, seed, mask, 9)
    keep = K.dropout_mask(seed, B, H, T, T, p, device=DEVICE)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, True, 0.25, keep, p, mask, 9)
    ref.backward(do.double())
    for name, o, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *(t.grad for t in leaves))):
        torch.testing.assert_close(o.double(), r.detach(), atol=2e-5, rtol=2e-5, msg=name)
    again = K.attention_backward(do, q, k, v, out, lse, True, 0.25, p, seed, mask, 9)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))  # deterministic: dk, dv summed in head order


def test_attention_masks_match_the_cpu_kernels():
    # one mask, one window, grouped heads: the Triton kernels and the C++ ones agree
    from nanofast import ops
    from test_ops_attention_masks import _qkv as _qkv_heads
    q, k, v, do = _qkv_heads(2, 4, 2, 37, 37, 16, torch.float32)
    kw = dict(attn_mask=_pad_mask(2, 37, [37, 11]), is_causal=True, window=12, enable_gqa=True)
    cpu = _run_attn(lambda a, b, c: ops.scaled_dot_product_attention(a.cpu(), b.cpu(), c.cpu(), **kw), q, k, v, do,
                    torch.float32)
    dev_kw = dict(kw, attn_mask=kw["attn_mask"].to(DEVICE))
    tri = _run_attn(lambda a, b, c: K.scaled_dot_product_attention(a, b, c, **dev_kw), q, k, v, do, torch.float32)
    for a, b in zip(cpu, tri):
        torch.testing.assert_close(a.cpu(), b.cpu(), atol=2e-5, rtol=2e-5)


def test_attention_without_keys_gives_zeros_like_torch():
    q, k = torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True), torch.randn(1, 2, 0, 16, device=DEVICE)
    out = K.scaled_dot_product_attention(q, k, k)
    assert torch.equal(out, F.scaled_dot_product_attention(q.detach(), k, k))
    out.sum().backward()
    assert not q.grad.any()


def test_import_without_triton():
    """Importing the kernels package must not need triton; using it then fails clearly."""
    code = (
        "import sys, importlib.util\n"
        "sys.modules['triton'] = None\n"  # import triton now raises ImportError
        f"root = {str(_REPO / 'kernels')!r}\n"
        "spec = importlib.util.spec_from_file_location('kx', root + '/__init__.py', "
        "submodule_search_locations=[root])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['kx'] = m; spec.loader.exec_module(m)\n"
        "assert m.HAS_TRITON is False\n"
        "import torch\n"
        "try:\n"
        "    m.layer_norm(torch.ones(2, 3), (3,))\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e); print('ok')\n"
    )
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


_AOT_SCRIPT = r'''
import importlib.util, os, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("kx", os.path.join(root, "__init__.py"), submodule_search_locations=[root])
m = importlib.util.module_from_spec(spec); sys.modules["kx"] = m; spec.loader.exec_module(m)
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import kx.attention as A, kx.layernorm as L
target = GPUTarget("cuda", 90, 32)
PTR = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "Y", "W", "B", "DY", "DX"}
F32PTR = {"LSE", "Delta", "Mean", "Rstd", "DW_PART", "DB_PART", "PART"}
FLOATS = {"qk_scale", "sm_scale", "dropout_p", "drop_scale", "eps"}

def compile_(fn, dt, constexprs, num_warps, num_stages=1, floats="fp32", mask="*i1"):
    sig, attrs, constexprs = {}, {}, dict(constexprs)
    for i, n in enumerate(fn.arg_names):
        if n.startswith("stride_") and n.endswith("d"):
            constexprs[n] = 1  # as the JIT specialises a unit stride
        if n in constexprs:
            sig[n] = "constexpr"
            continue
        sig[n] = ("*" + dt if n in PTR or n == "OUT" else "*fp32" if n in F32PTR else "*i8" if n == "MASK"
                  else mask if n == "MASKP" else "*i64" if n == "SEED" else floats if n in FLOATS else "i32")
        if sig[n].startswith("*") or n.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target,
                   options=dict(num_warps=num_warps, num_stages=num_stages))
    print("compiled", fn.__name__, constexprs, floats, flush=True)

# float scalars as Triton's launcher passes them (fp32) and as torch.compile's launches do (fp64)
for dt, tdt, floats in (("bf16", torch.bfloat16, "fp32"), ("fp32", torch.float32, "fp32"),
                        ("bf16", torch.bfloat16, "fp64")):
    fake = type("FakeCudaTensor", (), {"is_cuda": True, "dtype": tdt})()
    for kname, fn in (("fwd", A._attn_fwd_kernel), ("dkdv", A._attn_bwd_dkdv_kernel), ("dq", A._attn_bwd_dq_kernel)):
        bm, bn, bd, w, st = A._config(fake, 80, kname, True)
        # no mask tensor; a bool mask (torch.bool: *i1) with a window; an additive mask in the inputs' dtype
        for mask_kind, window, mask in ((0, False, "*i1"), (1, True, "*i1"), (2, False, "*" + dt)):
            compile_(fn, dt, dict(HEAD_DIM=80, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IS_CAUSAL=True, HAS_WINDOW=window,
                                  MASK_KIND=mask_kind, HAS_DROPOUT=True, DOT_PREC="ieee" if dt == "fp32" else "tf32",
                                  UPCAST=False), w, st, floats=floats, mask=mask)
compile_(A._attn_bwd_preprocess_kernel, "bf16", dict(HEAD_DIM=80, BLOCK_M=64, BLOCK_D=128), 4)
compile_(A._dropout_mask_kernel, "bf16", dict(BLOCK_M=32, BLOCK_N=128), 4)
for one, bn, bm in ((True, 512, 8), (False, 2048, 2)):
    for floats in ("fp32", "fp64"):
        compile_(L._layer_norm_fwd_kernel, "bf16", dict(HAS_W=True, HAS_B=True, BLOCK_M=bm, BLOCK_N=bn,
                                                        ONE_BLOCK=one), 8, floats=floats)
    compile_(L._layer_norm_bwd_kernel, "bf16", dict(HAS_W=True, NEED_DW=True, NEED_DB=True, BLOCK_M=bm, BLOCK_N=bn,
                                                    ONE_BLOCK=one), 8)
compile_(L._sum_partials_kernel, "fp32", dict(BLOCK_G=32, BLOCK_N=256), 4)
print("all compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Compile every kernel for an H100 (sm_90) without a GPU: catches what the interpreter lets through
    (type rules of the compiler, unsupported ops), with dropout on, a padded head dim, both dtypes, bool
    and additive attention masks and a window, and float arguments in float64 as torch.compile passes
    them to the triton_ops' kernels."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(_REPO / "kernels")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and "all compiled" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


# --------------------------------------------------------------------------------------------------
# Agreement with the C++ CPU kernels through nanofast.ops
# --------------------------------------------------------------------------------------------------

def _ops_or_skip():
    try:
        import nanofast._C  # noqa: F401
        import nanofast.ops as ops
    except Exception as e:  # not built yet, or the ops layer is unfinished
        pytest.skip(f"nanofast.ops / nanofast._C not importable: {e!r}")
    for name in ("layer_norm", "scaled_dot_product_attention", "dropout_mask"):
        if not hasattr(ops, name):
            pytest.skip(f"nanofast.ops has no {name} yet")
    return ops


def test_ops_cpu_kernels_agree_layer_norm():
    ops = _ops_or_skip()
    N, C = 37, 100
    x, w, b, dy = _ln_inputs(N, C, torch.float32, "wb", seed=13)
    cpu = _ln_run(ops.layer_norm, x, w, b, dy, (C,))
    tri = _ln_run(K.layer_norm, *(t.to(DEVICE) for t in (x, w, b, dy)), (C,))
    for name, a, c in zip(("y", "dx", "dw", "db"), cpu, tri):
        torch.testing.assert_close(c.cpu(), a, rtol=2e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_ops_cpu_kernels_agree_attention(causal):
    ops = _ops_or_skip()
    B, H, Tq, Tk, D = 1, 2, 33, 17, 24
    q, k, v, do = _qkv(B, H, Tq, Tk, D, seed=14)
    for p in (0.0, 0.25):
        def run(fn, device):
            torch.manual_seed(2024)  # both draw their dropout seed from the CPU generator (CPU tensors)
            leaves = [t.to(device, torch.float32).detach().requires_grad_() for t in (q, k, v)]
            out = fn(*leaves, dropout_p=p, is_causal=causal)
            out.backward(do.to(device, torch.float32))
            return (out.detach().cpu(),) + tuple(t.grad.cpu() for t in leaves)

        cpu = run(ops.scaled_dot_product_attention, "cpu")
        tri = run(K.scaled_dot_product_attention, DEVICE)
        for name, a, c in zip(("out", "dq", "dk", "dv"), cpu, tri):
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5, msg=f"{name} p={p}")


def test_ops_cpu_kernels_agree_dropout_mask():
    ops = _ops_or_skip()
    for seed in (5, 2 ** 40 + 1):
        cpu = ops.dropout_mask(seed, 2, 3, 17, 33, 0.3)
        tri = K.dropout_mask(seed, 2, 3, 17, 33, 0.3, device=DEVICE)
        assert torch.equal(cpu.cpu().bool(), tri.cpu())


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: nanofast.ops dispatches CUDA tensors to Triton")
def test_ops_cuda_dispatch_matches_cpu():
    ops = _ops_or_skip()
    q, k, v, do = _qkv(2, 3, 100, 100, 64, seed=15)

    def run(device):
        # the same seed value on both devices (each device draws its own seeds), so the same mask
        seed = torch.tensor([123456789], device=device)
        leaves = [t.to(device, torch.float32) for t in (q, k, v)]
        out, lse = torch.ops.nanofast.sdpa_fwd(*leaves, True, 0.125, 0.1, seed)
        grads = torch.ops.nanofast.sdpa_bwd(do.to(device, torch.float32), *leaves, out, lse, True, 0.125, 0.1, seed)
        return (out.cpu(),) + tuple(g.cpu() for g in grads)

    for name, a, c in zip(("out", "dq", "dk", "dv"), run("cpu"), run("cuda")):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4, msg=name)
    x = torch.randn(64, 384)
    torch.testing.assert_close(ops.layer_norm(x.cuda(), (384,)).cpu(), ops.layer_norm(x, (384,)), rtol=1e-5, atol=1e-5)
