"""nanofast's bfloat16 GEMM (csrc/gemm_bf16.h, CPUs with AVX512-BF16): float32 or bfloat16 operands
rounded to bfloat16 while packed, float32 sums, float32 or bfloat16 results; and nanofast.ops.linear
under bfloat16 autocast, which runs on it."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanofast import _C, ops
from nanofast.ops import cpu
from nanofast.testing import assert_parity

needs_gemm_bf16 = pytest.mark.skipif(not _C.has_gemm_bf16(),
                                     reason="nanofast's bfloat16 GEMM needs a CPU with AVX512-BF16")
pytestmark = needs_gemm_bf16

CODE = {torch.float32: 0, torch.bfloat16: 2}
# (M, N, K): edges of the 12 x 32 tile, odd K (a half pair), K slices of up to 1024 (1025, 2100: with
# a bfloat16 C those sum in a float32 buffer first), row blocks of 192, column blocks of 2048
KERNEL_SHAPES = [(1, 1, 1), (7, 3, 5), (13, 33, 17), (12, 32, 16), (65, 97, 257), (193, 31, 64), (97, 65, 1025),
                 (40, 50, 2100), (25, 2100, 9)]
OPERANDS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
            (torch.bfloat16, torch.bfloat16)]


def _gemm(a, b, bias=None, out_dtype=torch.float32, threads=2, accumulate_into=None):
    """nanofast's bfloat16 GEMM whatever the size (the launcher leaves small products to torch)."""
    (M, K), N = a.shape, b.shape[1]
    out = torch.empty(M, N, dtype=out_dtype) if accumulate_into is None else accumulate_into
    assert _C.gemm_bf16(M, N, K, a.data_ptr(), *a.stride(), CODE[a.dtype], b.data_ptr(), *b.stride(), CODE[b.dtype],
                        out.data_ptr(), out.stride(0), CODE[out.dtype], 0 if bias is None else bias.data_ptr(),
                        0 if bias is None else CODE[bias.dtype], accumulate_into is not None, threads)
    return out


def _operands(M, N, K, layout, dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, M, generator=g).t() if layout[0] == "T" else torch.randn(M, K, generator=g)
    b = torch.randn(N, K, generator=g).t() if layout[1] == "T" else torch.randn(K, N, generator=g)
    return a.to(dtypes[0]), b.to(dtypes[1])


def _rounded64(t):
    return t.to(torch.bfloat16).double()


def _bits(t):
    return t.contiguous().view(-1).view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("dtypes", OPERANDS, ids=lambda d: f"{str(d[0])[6:]}@{str(d[1])[6:]}")
@pytest.mark.parametrize("layout", ["NN", "TN", "NT", "TT"])
@pytest.mark.parametrize("M,N,K", KERNEL_SHAPES)
def test_kernel_parity_with_float64(M, N, K, layout, dtypes):
    """Against float64: within the flash rule of torch's bfloat16 matmul (the same roundings of the
    operands), for a float32 and a bfloat16 C, with and without a bias."""
    a, b = _operands(M, N, K, layout, dtypes, M * 10000 + N * 100 + K)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(K))
    ref = a.double() @ b.double()
    theirs = torch.mm(a.bfloat16(), b.bfloat16())
    for c in (None, bias):
        r = ref if c is None else ref + c.double()
        t = theirs if c is None else torch.addmm(c.bfloat16(), a.bfloat16(), b.bfloat16())
        assert_parity("C (float32)", _gemm(a, b, c), t.float(), r)
        assert_parity("C (bfloat16)", _gemm(a, b, c, torch.bfloat16), t, r)


@pytest.mark.parametrize("M,N,K", KERNEL_SHAPES)
def test_products_are_of_the_operands_rounded_as_a_cast_rounds(M, N, K):
    """The float32 result is the float64 product of the operands cast to bfloat16 (round to nearest
    even), up to float32 summation error: rounding by truncation would miss by ~0.4% of each term."""
    a, b = _operands(M, N, K, "NT", OPERANDS[0], 7 + K)
    ours = _gemm(a, b).double()
    exact = _rounded64(a) @ _rounded64(b)
    scale = _rounded64(a).abs() @ _rounded64(b).abs()
    assert ((ours - exact).abs() <= 2 ** -22 * scale + 1e-30).all()


def test_bits_independent_of_layout_operand_dtype_and_threads():
    """Packing absorbs strides and rounds float32 as .to(torch.bfloat16) does; threads split whole
    tiles, each element summed in the same order."""
    M, N, K = 150, 70, 1100
    a, b = _operands(M, N, K, "NN", OPERANDS[0], 11)
    bias = torch.randn(N)
    want = {od: _gemm(a, b, bias, od) for od in (torch.float32, torch.bfloat16)}
    variants = [(a.t().contiguous().t(), b.t().contiguous().t()), (a.bfloat16(), b), (a, b.bfloat16()),
                (a.bfloat16(), b.bfloat16().t().contiguous().t()), (a[:, :].contiguous(), b)]
    for od, w in want.items():
        for x, y in variants:
            for threads in (1, 2, 3):
                assert torch.equal(_bits(_gemm(x, y, bias, od, threads)), _bits(w)), (od, x.stride(), y.stride())
    strided = torch.zeros(M, 2 * K)[:, ::2]  # neither stride 1: the element-by-element packing
    strided.copy_(a)
    assert torch.equal(_bits(_gemm(strided, b, bias)), _bits(want[torch.float32]))


def test_accumulate_adds_to_c():
    a, b = _operands(29, 45, 300, "NN", OPERANDS[1], 6)
    c = torch.randn(29, 45)
    out = _gemm(a, b, accumulate_into=c.clone())
    assert torch.equal(out, c + _gemm(a, b))  # one K slice: the tile is added to C once


def test_nan_and_inf_reach_only_their_rows_and_columns():
    a, b = torch.ones(200, 160), torch.ones(160, 70)
    a[3, 7], b[2, 30] = float("nan"), float("inf")
    for od in (torch.float32, torch.bfloat16):
        y = _gemm(a, b, out_dtype=od).float()
        assert y[3].isnan().all() and y[:, 30].isinf().sum() == 199 and y[3, 30].isnan()
        rest = torch.ones_like(y, dtype=torch.bool)
        rest[3], rest[:, 30] = False, False
        assert (y[rest] == 160).all()


def test_empty_k_gives_the_bias():
    bias = torch.randn(5)
    out = _gemm(torch.empty(3, 0), torch.empty(0, 5), bias, torch.bfloat16)
    assert torch.equal(out, bias.bfloat16().expand(3, 5))


def test_no_gemm_below_avx512_bf16():
    try:
        _C.select_isa("avx512")
        assert not _C.has_gemm_bf16()
        assert not _C.gemm_bf16(1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, False, 1)
    finally:
        _C.select_isa("auto")


# --- ops.linear under bfloat16 autocast -----------------------------------------------------------------

# (rows, in, out), all above the size where the launcher hands products to torch
LINEAR_SHAPES = [(768, 128, 384), (97, 513, 65), (40, 1100, 50), (193, 64, 175), (300, 200, 130)]


def _run(fn, x, w, b, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    leaves = (x, w) if b is None else (x, w, b.detach().clone().requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w, None if b is None else leaves[2])
    return (y.detach(),) + torch.autograd.grad(y, leaves, dy)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N,K,M", LINEAR_SHAPES)
def test_autocast_linear_parity_with_float64(N, K, M, bias):
    g = torch.Generator().manual_seed(N * 1000 + K + M)
    x, w = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) / K ** 0.5
    b = torch.randn(M, generator=g) if bias else None
    dy = torch.randn(N, M, generator=g).bfloat16()
    assert cpu.uses_gemm(N, M, K, torch.bfloat16)
    ours, theirs = _run(ops.linear, x, w, b, dy), _run(F.linear, x, w, b, dy)
    # the float64 reference of each output and gradient
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    bd = None if b is None else b.double().requires_grad_()
    yd = F.linear(xd, wd, bd)
    ref = (yd.detach(),) + torch.autograd.grad(yd, (xd, wd) if b is None else (xd, wd, bd), dy.double())
    for name, o, t, r in zip(["y", "dx", "dweight", "dbias"], ours, theirs, ref):
        assert_parity(name, o, t, r)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == ours[2].dtype == torch.float32


def test_weight_gradient_is_not_rounded_to_bfloat16():
    """autocast's weight gradient is a bfloat16 product cast to float32; nanofast's is the float32 sums."""
    g = torch.Generator().manual_seed(2)
    x, w, dy = torch.randn(300, 200, generator=g), torch.randn(130, 200, generator=g), torch.randn(300, 130, generator=g)
    _, _, dw = _run(ops.linear, x, w, None, dy.bfloat16())
    _, _, dw_torch = _run(F.linear, x, w, None, dy.bfloat16())
    assert torch.equal(dw_torch, dw_torch.bfloat16().float())
    assert not torch.equal(dw, dw.bfloat16().float())
    exact = dy.bfloat16().double().t() @ _rounded64(x)
    assert (dw.double() - exact).abs().max() < 1e-4 * exact.abs().max()


def test_autocast_linear_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(5)
    x, w, dy = torch.randn(300, 200, generator=g), torch.randn(130, 200, generator=g), torch.randn(300, 130, generator=g)
    runs, threads = [], torch.get_num_threads()
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            runs.append(_run(ops.linear, x, w, None, dy.bfloat16()))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(runs[0], other))


def test_autocast_bad_shapes_name_the_arguments():
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match=r"\(7, 5\).*\(4, 6\)"):
        ops.linear(torch.randn(7, 5), torch.randn(4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="bias must have shape"):
        ops.linear(torch.randn(7, 5), torch.randn(4, 5), torch.randn(3))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        ops.linear(torch.randn(7, 5), torch.randn(4, 5), [0.0] * 4)


def test_nanofast_gemm_env_turns_the_bfloat16_gemm_off():
    code = ("import torch, torch.nn.functional as F; from nanofast import _C, ops; assert not _C.has_gemm_bf16(); "
            "x, w = torch.randn(96, 256), torch.randn(128, 256)\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16): assert torch.equal(ops.linear(x, w), F.linear(x, w))")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "NANOFAST_GEMM": "0"}, check=True)


def test_autocast_runs_the_gemm_only_above_its_size():
    """Small products stay autocast's own F.linear: no autograd.Function around them. (Sampling's one-row
    products run nanofast's matrix-vector kernel: tests/test_ops_linear_gemv.py.)"""
    w = torch.randn(1536, 384, requires_grad=True)
    w_small = torch.randn(384, 128, requires_grad=True)
    x24, x64 = torch.randn(24, 128), torch.randn(64, 384)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small, large = ops.linear(x24, w_small), ops.linear(x64, w)
        assert torch.equal(small, F.linear(x24, w_small))
    assert type(large.grad_fn).__name__ == "_EagerLinearBackward"
    assert type(small.grad_fn).__name__ != "_EagerLinearBackward" and small.dtype == torch.bfloat16


def test_kernel_refuses_what_it_cannot_do():
    a, b = torch.randn(4, 8), torch.randn(8, 5)
    c16 = torch.empty(4, 5, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="accumulate .* needs a float32 C"):
        _C.gemm_bf16(4, 5, 8, a.data_ptr(), 8, 1, 0, b.data_ptr(), 5, 1, 0, c16.data_ptr(), 5, 2, 0, 0, True, 1)
    with pytest.raises(ValueError, match="a must be float32 .* got dtype code 1"):
        _C.gemm_bf16(4, 5, 8, a.data_ptr(), 8, 1, 1, b.data_ptr(), 5, 1, 0, c16.data_ptr(), 5, 2, 0, 0, False, 1)
