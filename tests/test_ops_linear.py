"""nanofast.ops.linear / nanofast.nn.Linear: nanofast's float32 GEMM (AVX-512 CPUs) behind F.linear's
signature, with torch's matmul for other dtypes and instruction sets."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanofast import _C, nn, ops
from nanofast.ops import cpu
from nanofast.testing import assert_parity

needs_gemm = pytest.mark.skipif(not _C.has_gemm(), reason="nanofast's GEMM needs a CPU with AVX-512")


def _run(fn, x, w, b, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    leaves = (x, w) if b is None else (x, w, b.detach().clone().requires_grad_())
    y = fn(x, w, None if b is None else leaves[2])
    return (y.detach(),) + torch.autograd.grad(y, leaves, dy)


def _bits(t):
    return t.contiguous().view(-1).view(torch.int32)


# (rows, in, out): small products (torch's matmul) and large ones (the GEMM), odd sizes
SHAPES = [(1, 1, 1), (7, 5, 3), (13, 17, 33), (65, 257, 97), (193, 64, 175), (97, 513, 65), (40, 1100, 50),
          (768, 128, 384)]
# (M, N, K) for the GEMM itself: edges of the 12 x 32 tile, K slices of up to 512 (513, 1100: uneven),
# row blocks of 192, column blocks of 2048
KERNEL_SHAPES = [(1, 1, 1), (7, 3, 5), (13, 33, 17), (12, 32, 16), (65, 97, 257), (193, 31, 64), (97, 65, 513),
                 (40, 50, 1100), (25, 2100, 9)]


def _gemm(a, b, bias=None):
    """nanofast's GEMM whatever the size (the launcher leaves small products to torch)."""
    (M, K), N = a.shape, b.shape[1]
    out = torch.empty(M, N)
    assert _C.gemm(M, N, K, a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(), out.data_ptr(), N,
                   0 if bias is None else bias.data_ptr(), False, 2)
    return out


@needs_gemm
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["NN", "TN", "NT", "TT"])
@pytest.mark.parametrize("M,N,K", KERNEL_SHAPES)
def test_gemm_kernel_parity_with_float64(M, N, K, layout, bias):
    g = torch.Generator().manual_seed(M * 10000 + N * 100 + K)
    a = torch.randn(K, M, generator=g).t() if layout[0] == "T" else torch.randn(M, K, generator=g)
    b = torch.randn(N, K, generator=g).t() if layout[1] == "T" else torch.randn(K, N, generator=g)
    c = torch.randn(N, generator=g) if bias else None
    ours = _gemm(a, b, c)
    theirs = a @ b if c is None else torch.addmm(c, a, b)
    ref = a.double() @ b.double() + (0 if c is None else c.double())
    assert_parity("C", ours, theirs, ref)


@needs_gemm
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N,K,M", SHAPES)
def test_parity_with_float64(N, K, M, bias):
    g = torch.Generator().manual_seed(N * 1000 + K + M)
    x, w = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) / K ** 0.5
    b = torch.randn(M, generator=g) if bias else None
    dy = torch.randn(N, M, generator=g)
    ours, theirs = _run(ops.linear, x, w, b, dy), _run(F.linear, x, w, b, dy)
    ref = _run(F.linear, x.double(), w.double(), None if b is None else b.double(), dy.double())
    for name, o, t, r in zip(["y", "dx", "dweight", "dbias"], ours, theirs, ref):
        assert_parity(name, o, t, r)


@needs_gemm
@pytest.mark.parametrize("layout", ["x transposed", "weight transposed", "3-D input", "strided rows"])
def test_non_contiguous_inputs_give_the_same_bits(layout):
    """The operands are packed before the products, so a view's strides change nothing."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(4, 48, 96, generator=g), torch.randn(160, 96, generator=g), torch.randn(160, generator=g)
    assert cpu.uses_gemm(4 * 48, 160, 96, torch.float32)
    dense = ops.linear(x, w, b)
    if layout == "x transposed":
        got = ops.linear(x.transpose(-1, -2).contiguous().transpose(-1, -2), w, b)
    elif layout == "weight transposed":
        got = ops.linear(x, w.t().contiguous().t(), b)
    elif layout == "3-D input":
        got = ops.linear(x.reshape(192, 96), w, b).view(4, 48, 160)
    else:
        wide = torch.zeros(4, 48, 200)
        wide[..., 30:126] = x
        got = ops.linear(wide[..., 30:126], w, b)
    assert torch.equal(_bits(got), _bits(dense))


@needs_gemm
def test_matches_torchs_matmul_bit_for_bit_without_the_gemm():
    """Where the instruction set has no GEMM of its own (below AVX-512), torch's matmul runs."""
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(96, 256, generator=g), torch.randn(128, 256, generator=g), torch.randn(128, generator=g)
    ours = ops.linear(x, w, b)
    try:
        _C.select_isa("avx2")
        assert not _C.has_gemm()
        fallback = ops.linear(x, w, b)
    finally:
        _C.select_isa("auto")
    assert _C.has_gemm()
    assert torch.equal(fallback, F.linear(x, w, b))
    torch.testing.assert_close(ours, fallback, rtol=1e-5, atol=1e-5)


@needs_gemm
def test_deterministic_and_independent_of_the_thread_count():
    g = torch.Generator().manual_seed(5)
    x, w, dy = torch.randn(300, 200, generator=g), torch.randn(130, 200, generator=g), torch.randn(300, 130, generator=g)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            runs.append(_run(ops.linear, x, w, None, dy))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(_bits(a), _bits(b))


@needs_gemm
def test_accumulate_adds_to_c():
    g = torch.Generator().manual_seed(6)
    a, b, c = torch.randn(29, 300, generator=g), torch.randn(300, 45, generator=g), torch.randn(29, 45, generator=g)
    out = c.clone()
    assert _C.gemm(29, 45, 300, a.data_ptr(), 300, 1, b.data_ptr(), 45, 1, out.data_ptr(), 45, 0, True, 2)
    torch.testing.assert_close(out.double(), c.double() + a.double() @ b.double(), rtol=1e-5, atol=1e-4)


@needs_gemm
def test_nan_and_inf_reach_only_their_rows_and_columns():
    x, w = torch.ones(200, 160), torch.ones(70, 160)
    assert cpu.uses_gemm(200, 70, 160, torch.float32)
    x[3, 7], w[30, 2] = float("nan"), float("inf")
    y = ops.linear(x, w)
    assert y[3].isnan().all() and y[:, 30].isinf().sum() == 199 and y[3, 30].isnan()
    rest = torch.ones_like(y, dtype=torch.bool)
    rest[3], rest[:, 30] = False, False
    assert (y[rest] == 160).all()


def test_small_products_use_torchs_matmul():
    """A small product would spend more on packing than MKL on the whole call. (A matrix-vector product,
    sampling one token, runs nanofast's matrix-vector kernel: tests/test_ops_linear_gemv.py.)"""
    assert not cpu.uses_gemm(1, 1536, 384, torch.float32) and not cpu.uses_gemm(24, 384, 128, torch.float32)
    assert not cpu.uses_gemv(24, 384, 128, torch.float32)
    x, w = torch.randn(24, 128), torch.randn(384, 128)
    assert torch.equal(ops.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("shape", [(0, 8), (5, 0)])
def test_empty(shape):
    x, w, b = torch.randn(*shape, requires_grad=True), torch.randn(6, shape[1], requires_grad=True), torch.randn(6)
    y = ops.linear(x, w, b)
    torch.testing.assert_close(y, F.linear(x, w, b))
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and not w.grad.any()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(ops.linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.linear(x, w), (x, w))


@pytest.mark.parametrize("args, match", [
    (((3, 5), (4, 6), None), r"input's last dimension must equal weight's in_features: input has shape \(3, 5\), "
                             r"weight \(4, 6\)"),
    (((3, 5), (5,), None), r"weight must be 2-D .* got shape \(5,\)"),
    (((3, 5), (4, 5), (5,)), r"bias must have shape \(4,\) .* got \(5,\)"),
    (((), (4, 5), None), r"input's last dimension"),
])
def test_bad_shapes(args, match):
    x, w, b = (None if s is None else torch.randn(s) for s in args)
    with pytest.raises(ValueError, match=match):
        ops.linear(x, w, b)


def test_bad_dtypes():
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but input has dtype torch.float32"):
        ops.linear(x, w.double())
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        ops.linear(torch.ones(3, 5, dtype=torch.int64), w)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        ops.linear(x, [[1.0] * 5])


def test_autocast_below_the_gemms_size_runs_torchs_bfloat16_matmul():
    """(Above it, on CPUs with AVX512-BF16, nanofast's bfloat16 GEMM: tests/test_ops_linear_bf16.py.)"""
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = ops.linear(x, w), F.linear(x, w)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)


def test_float16_and_other_devices_are_torchs():
    x, w = torch.randn(8, 16).half(), torch.randn(4, 16).half()
    assert torch.equal(ops.linear(x, w), F.linear(x, w))
    x, w = torch.randn(8, 16, device="meta"), torch.randn(4, 16, device="meta")
    assert ops.linear(x, w).shape == (8, 4)


def test_module_is_a_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.Linear(24, 10)
    ours = nn.Linear(24, 10)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) and isinstance(ours, torch.nn.Linear)
    x = torch.randn(3, 7, 24)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_opcheck():
    from torch.library import opcheck

    x, w, b = torch.randn(9, 20), torch.randn(13, 20, requires_grad=True), torch.randn(13, requires_grad=True)
    opcheck(torch.ops.nanofast.linear_fwd.default, (x, w, b))
    opcheck(torch.ops.nanofast.linear_fwd.default, (x, w, None))
    dy = torch.randn(9, 13)
    opcheck(torch.ops.nanofast.linear_bwd.default, (dy, x, w.detach(), True, True))
    opcheck(torch.ops.nanofast.linear_bwd.default, (dy, x, w.detach(), False, True))


def test_compile_fullgraph():
    x = torch.randn(2, 5, 20, requires_grad=True)
    w, b = torch.randn(13, 20, requires_grad=True), torch.randn(13, requires_grad=True)
    compiled = torch.compile(lambda x, w, b: ops.linear(x, w, b).square().sum(), fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, b)
    grads = torch.autograd.grad(loss, (x, w, b))
    eager = ops.linear(x, w, b).square().sum()
    torch.testing.assert_close(loss, eager)
    for got, want in zip(grads, torch.autograd.grad(eager, (x, w, b))):
        torch.testing.assert_close(got, want)


def test_mm_launcher_result_is_contiguous_for_any_operand_layout():
    a, b = torch.randn(40, 17).t(), torch.randn(40, 23)  # (17, 40) column-major @ (40, 23)
    out = cpu.mm(a, b)
    assert out.is_contiguous() and out.shape == (17, 23)
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)


def test_nanofast_gemm_env_turns_the_gemm_off():
    code = ("import torch, torch.nn.functional as F; from nanofast import _C, ops; assert not _C.has_gemm(); "
            "x, w = torch.randn(96, 256), torch.randn(128, 256); assert torch.equal(ops.linear(x, w), F.linear(x, w))")
    env = {**os.environ, "NANOFAST_GEMM": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
