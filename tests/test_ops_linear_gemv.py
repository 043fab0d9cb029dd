"""nanofast's matrix-vector kernel (csrc/gemv.h): a few rows of x against a weight read once, float32
or bfloat16 products, float32 sums; and nanofast.ops.linear, which runs it for sampling's products."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanofast import _C, ops
from nanofast.ops import cpu
from nanofast.testing import assert_parity

CODE = {torch.float32: 0, torch.bfloat16: 2}
# (M, N, K): every row count up to 8 (the 4-row passes and their remainders), K around the 4-vector step
# of 64 floats (AVX-512) and its single vectors, N and K large enough for the threaded path
KERNEL_SHAPES = [(1, 1, 1), (1, 7, 15), (2, 9, 16), (3, 5, 17), (4, 33, 63), (5, 17, 64), (6, 3, 65), (7, 40, 129),
                 (8, 31, 200), (1, 700, 300), (3, 257, 769), (8, 129, 1100)]
OPERANDS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
            (torch.bfloat16, torch.bfloat16)]


def _gemv(x, w, bias=None, bf16_products=False, out_dtype=torch.float32, threads=2):
    """The kernel itself, whatever the size (the launcher leaves small weights to torch)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=out_dtype)
    _C.gemv(M, N, K, x.data_ptr(), x.stride(0), CODE[x.dtype], w.data_ptr(), w.stride(0), CODE[w.dtype],
            0 if bias is None else bias.data_ptr(), 0 if bias is None else CODE[bias.dtype], y.data_ptr(), N,
            CODE[out_dtype], bf16_products, threads)
    return y


def _operands(M, N, K, seed, dtypes=(torch.float32, torch.float32), bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtypes[0])
    w = torch.randn(N, K, generator=g).to(dtypes[1])
    b = torch.randn(N, generator=g).to(dtypes[1]) if bias else None
    return x, w, b


def _bits(t):
    return t.contiguous().view(-1).view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _rounded64(t):
    return None if t is None else t.to(torch.bfloat16).double()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,K", KERNEL_SHAPES)
def test_float32_parity_with_float64(isa, M, N, K, bias):
    x, w, b = _operands(M, N, K, M * 10000 + N * 100 + K, bias=bias)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert_parity("y", _gemv(x, w, b), F.linear(x, w, b), ref)


@pytest.mark.parametrize("dtypes", OPERANDS, ids=lambda d: f"{str(d[0])[6:]}@{str(d[1])[6:]}")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", KERNEL_SHAPES)
def test_bfloat16_products_parity_with_float64(M, N, K, dtypes, out_dtype):
    """Each operand rounded to bfloat16 as a cast rounds it, exact products, float32 sums."""
    x, w, b = _operands(M, N, K, M * 10000 + N * 100 + K + 1, dtypes)
    ours = _gemv(x, w, b, bf16_products=True, out_dtype=out_dtype)
    theirs = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).to(out_dtype)
    ref = F.linear(_rounded64(x), _rounded64(w), _rounded64(b))
    assert_parity("y", ours, theirs, ref)


def test_rows_independent_of_the_other_rows_and_threads(isa):
    """Each y[m] is one dot product per column summed in a fixed order: batch 1 and batch 8 give the same
    bits for a row, with any number of threads, from either operand dtype."""
    x, w, b = _operands(8, 300, 770, 3)
    for bf16 in (False, True):
        whole = _gemv(x, w, b, bf16)
        for threads in (1, 2, 3):
            assert torch.equal(_bits(_gemv(x, w, b, bf16, threads=threads)), _bits(whole))
        for m in (0, 5, 7):
            assert torch.equal(_bits(_gemv(x[m:m + 1], w, b, bf16)), _bits(whole[m:m + 1]))
            assert torch.equal(_bits(_gemv(x[m:m + 3], w, b, bf16)), _bits(whole[m:m + 3]))
        if bf16:  # rounding while loading = rounding first
            assert torch.equal(_bits(_gemv(x.bfloat16(), w.bfloat16(), b.bfloat16(), True)), _bits(whole))


def test_nan_and_inf_reach_only_their_rows_and_columns():
    x, w = torch.ones(3, 200), torch.ones(70, 200)
    x[1, 7], w[30, 2] = float("nan"), float("inf")
    for bf16 in (False, True):
        y = _gemv(x, w, bf16_products=bf16)
        assert y[1].isnan().all() and y[:, 30].isinf().sum() == 2 and y[1, 30].isnan()
        rest = torch.ones_like(y, dtype=torch.bool)
        rest[1], rest[:, 30] = False, False
        assert (y[rest] == 200).all()


def test_kernel_refuses_what_it_cannot_do():
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    y = torch.empty(2, 5)
    with pytest.raises(ValueError, match="w must be float32 .* got dtype code 1"):
        _C.gemv(2, 5, 8, x.data_ptr(), 8, 0, w.data_ptr(), 8, 1, 0, 0, y.data_ptr(), 5, 0, False, 1)
    with pytest.raises(ValueError, match="float32 products need float32"):
        _C.gemv(2, 5, 8, x.data_ptr(), 8, 2, w.data_ptr(), 8, 0, 0, 0, y.data_ptr(), 5, 0, False, 1)


# ---- nanofast.ops.linear on it ----

needs_gemv = pytest.mark.skipif(not _C.has_gemv(), reason="NANOFAST_GEMM=0, or an Intel CPU: torch's matmul")


@needs_gemv
@pytest.mark.parametrize("layout", ["contiguous", "3-D input", "strided rows", "x transposed"])
def test_linear_runs_it_for_a_few_rows(layout):
    g = torch.Generator().manual_seed(9)
    w, b = torch.randn(384, 200, generator=g), torch.randn(384, generator=g)
    x = torch.randn(3, 200, generator=g)
    assert cpu.uses_gemv(3, 384, 200, torch.float32) and not cpu.uses_gemm(3, 384, 200, torch.float32)
    view = {"contiguous": x, "3-D input": x.view(3, 1, 200), "strided rows": torch.randn(3, 400)[:, ::2].copy_(x),
            "x transposed": x.t().contiguous().t()}[layout]
    y = ops.linear(view, w, b)
    assert y.shape == view.shape[:-1] + (384,)
    assert torch.equal(y.reshape(3, 384), _gemv(x, w, b))


@needs_gemv
def test_linear_sizes_that_run_it():
    assert cpu.uses_gemv(1, 768, 768, torch.float32) and cpu.uses_gemv(8, 50304, 768, torch.bfloat16)
    assert not cpu.uses_gemv(9, 768, 768, torch.float32)  # more rows: the GEMM or torch's matmul
    assert not cpu.uses_gemv(1, 4, 16, torch.float32)  # a small weight: torch's matmul
    assert not cpu.uses_gemv(1, 768, 768, torch.float64)
    x, w = torch.randn(2, 16), torch.randn(4, 16)
    assert torch.equal(ops.linear(x, w), F.linear(x, w))


@needs_gemv
def test_linear_under_autocast_runs_it_on_float32_or_bfloat16_weights():
    """Sampling under bfloat16 autocast: the same bits from float32 weights (rounded while read) and from
    weights stored in bfloat16, and the parity rule against torch's autocast product."""
    x, w, b = _operands(2, 512, 300, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_f32, theirs = ops.linear(x, w, b), F.linear(x, w, b)
        from_bf16 = ops.linear(x, w.bfloat16(), b)
    assert from_f32.dtype == from_bf16.dtype == torch.bfloat16
    assert torch.equal(_bits(from_f32), _bits(from_bf16))
    assert_parity("y", from_f32, theirs, F.linear(_rounded64(x), _rounded64(w), _rounded64(b)))


@needs_gemv
def test_linear_gradients_through_it():
    x, w, b = _operands(2, 300, 130, 12)
    dy = torch.randn(2, 300)
    grads = []
    for fn in (ops.linear, F.linear):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        fn(*leaves).backward(dy)
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_nanofast_gemm_env_turns_it_off():
    code = ("import torch, torch.nn.functional as F; from nanofast import _C, ops; assert not _C.has_gemv(); "
            "x, w = torch.randn(1, 256), torch.randn(512, 256); assert torch.equal(ops.linear(x, w), F.linear(x, w))")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "NANOFAST_GEMM": "0"}, check=True)
