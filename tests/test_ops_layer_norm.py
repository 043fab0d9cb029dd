import pytest
import torch
import torch.nn.functional as F

import nanofast
from nanofast import ops
from nanofast.testing import assert_parity


def _inputs(shape, dtype, affine=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w = (torch.randn(C, generator=g, dtype=torch.float64)).to(dtype) if affine else None
    b = (torch.randn(C, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], (x.shape[-1],), leaves[1], leaves[2], 1e-5)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def _check(x, w, b, dy):
    ours = _run(ops.layer_norm, x, w, b, dy)
    theirs = _run(F.layer_norm, x, w, b, dy)
    ref = _run(F.layer_norm, *(t.double() if t is not None else None for t in (x, w, b, dy)))
    for name, o, t, r in zip(["y", "dx", "dweight", "dbias"], ours, theirs, ref):
        assert_parity(name, o, t, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [1, 7, 63, 64, 65, 128, 384, 1000, 4099])
def test_parity_widths(C, dtype, isa):
    _check(*_inputs((37, C), dtype))


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False), (False, True)])
def test_optional_weight_and_bias(affine, bias):
    _check(*_inputs((5, 3, 96), torch.float32, affine, bias))


def test_rows_many_and_3d():
    _check(*_inputs((4, 300, 128), torch.float32))


def test_non_contiguous_input_and_grad():
    x, w, b, dy = _inputs((64, 256), torch.float32)
    x = x[:, ::2]  # last-dim stride 2
    dy = dy.t().contiguous().t()[:, :128]
    _check(x, w[:128], b[:128], dy)
    x2 = torch.randn(8, 10, 96)[:, 2:7]  # row gaps, packed last dim
    _check(x2, *_inputs((96,), torch.float32)[1:3], torch.randn(8, 5, 96))


def test_multi_dim_normalized_shape():
    x = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = ops.layer_norm(x, (4, 5), w, None)
    torch.testing.assert_close(y, F.layer_norm(x, (4, 5), w, None), rtol=0, atol=1e-12)


def test_large_mean_is_stable():
    # A row with a large offset: E[x^2] - E[x]^2 would lose every digit in float32.
    x = torch.randn(16, 128) * 1e-2 + 1e4
    _check(x, None, None, torch.randn(16, 128))


@pytest.mark.parametrize("C", [2**20] + [pytest.param(2**k, marks=pytest.mark.slow) for k in (24, 26)])
def test_long_row_parity(C):
    # One accumulator carried across a row of millions of elements grows until each addend loses most
    # of its bits: the row sums (mean, variance, and the backward's two row means) must be blocked.
    _check(*_inputs((1, C), torch.float32))


@pytest.mark.parametrize("C", [128, 1000])  # the register-resident row and the general one
def test_huge_values_are_normalised(C):
    # |x| near 1e20: the squared deviations overflow float32, but normalising is scale-invariant, so a
    # row must not collapse to the bias (torch's float32 gives NaN here, float64 the finite answer).
    x, w, b, dy = _inputs((4, C), torch.float32)
    x = x * 1e20
    ours = _run(ops.layer_norm, x, w, b, dy)
    ref = _run(F.layer_norm, x.double(), w.double(), b.double(), dy.double())
    for name, o, r, scale in zip(["y", "dx", "dweight", "dbias"], ours, ref, [1, 1e20, 1, 1]):
        torch.testing.assert_close(o.double() * scale, r * scale, rtol=1e-5, atol=1e-5, msg=name)


def test_gradcheck_float64():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, (6,), w, b), (x, w, b))


@pytest.mark.parametrize("shape", [(1000, 384), (3000, 128), (5000, 200), (7, 3 * 4096 + 5)],
                         ids=["16-row-chunks", "regs-48-row-chunks", "generic-80-row-chunks", "blocked-row-sums"])
def test_deterministic_and_thread_independent(shape):
    """dweight and dbias sum per-chunk partials in a fixed order; chunks grow with N (at most 64), never
    with the threads."""
    x, w, b, dy = _inputs(shape, torch.float32)
    threads = torch.get_num_threads()
    try:
        first = _run(ops.layer_norm, x, w, b, dy)
        again = _run(ops.layer_norm, x, w, b, dy)
        others = []
        for n in (1, 3):
            torch.set_num_threads(n)
            others.append(_run(ops.layer_norm, x, w, b, dy))
    finally:
        torch.set_num_threads(threads)
    for a, b2, *c in zip(first, again, *others):
        assert torch.equal(a, b2) and all(torch.equal(a, ci) for ci in c)


@pytest.mark.parametrize("shape", [(5000, 128), (3000, 200)])
def test_many_rows_parity(shape):
    _check(*_inputs(shape, torch.float32))


# 16 MiB of float32 rows: outputs this large are written with streaming stores (csrc/simd.h,
# stream_output); 8193 rows also leave a chunk of rows that is not whole.
STREAMED = (8193, 512)


def test_streamed_outputs_parity_and_rows():
    """At a size whose y and dx are streamed past the cache: parity with float64, and each row's bits
    the same as when that row is normalised in a small tensor (whose stores are plain)."""
    x, w, b, dy = _inputs(STREAMED, torch.float32)
    _check(x, w, b, dy)
    big = _run(ops.layer_norm, x, w, b, dy)
    for rows in (slice(0, 64), slice(8193 - 70, 8193)):
        small = _run(ops.layer_norm, x[rows], w, b, dy[rows])
        assert torch.equal(big[0][rows], small[0]) and torch.equal(big[1][rows], small[1])


def test_empty():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = ops.layer_norm(x, (16,), w, None)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16))


def test_nan_propagates_like_torch():
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    ours, theirs = ops.layer_norm(x, (32,)), F.layer_norm(x, (32,))
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.layer_norm(torch.randn(3, 4), (5,)), r"normalized_shape \(5,\).*\(3, 4\)"),
    (lambda: ops.layer_norm(torch.randn(3, 4), (4,), torch.randn(5)), r"weight has shape \(5,\)"),
    (lambda: ops.layer_norm(torch.randn(3, 4), (4,), None, torch.randn(4, dtype=torch.float64)), "bias has dtype"),
    (lambda: ops.layer_norm(torch.arange(12).view(3, 4), (4,)), "input must be a floating-point tensor"),
    (lambda: ops.layer_norm(torch.randn(3, 4).half(), (4,)), "does not support"),
    (lambda: ops.layer_norm([1.0, 2.0], (2,)), "input must be a torch.Tensor"),
    (lambda: ops.layer_norm(torch.randn(3, 4), (4,), eps=-1.0), "eps must be"),
    (lambda: ops.layer_norm(torch.randn(3, 4), (4,), eps=float("nan")), "eps must be"),
    # each one argument away from the everyday case that skips the full checks
    (lambda: ops.layer_norm(torch.randn(3, 4), 4.0), "normalized_shape must be an int or a sequence of ints"),
    (lambda: ops.layer_norm(torch.randn(3, 4), (4,), torch.randn(1, 4)), r"weight has shape \(1, 4\)"),
    (lambda: ops.layer_norm(torch.randn(3, 4), (4,), torch.randn(4), torch.randn(3)), r"bias has shape \(3,\)"),
    (lambda: ops.layer_norm(torch.randn(3, 4), (4,), torch.randn(4).bfloat16()), "weight has dtype"),
    (lambda: ops.layer_norm(torch.randn(3, 4), (4,), torch.randn(4), torch.randn(4, device="meta")), "bias is on meta"),
    (lambda: ops.layer_norm(torch.randn(3, 4), (4,), [1.0] * 4), "weight must be a torch.Tensor"),
    (lambda: ops.layer_norm(torch.randn(3, 4, device="meta"), (4,)), "nanofast runs on CPU and CUDA tensors only"),
])
def test_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_module_is_drop_in():
    ref = torch.nn.LayerNorm(48, eps=1e-6, bias=False)
    ours = nanofast.nn.LayerNorm(48, eps=1e-6, bias=False)
    assert list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        ref.weight.normal_()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 48)
    torch.testing.assert_close(ours(x), ref(x))


def test_opcheck():
    from torch.library import opcheck

    x, w, b, dy = _inputs((6, 40), torch.float32)
    opcheck(torch.ops.nanofast.layer_norm_fwd.default, (x.requires_grad_(), w.requires_grad_(), b, 1e-5))
    y, mean, rstd = torch.ops.nanofast.layer_norm_fwd(x.detach(), w.detach(), b, 1e-5)
    opcheck(torch.ops.nanofast.layer_norm_bwd.default, (dy, x.detach(), w.detach(), mean, rstd, True, False))


def test_strided_weight_and_bias():
    # Views such as every other element of a buffer: the kernels index parameters densely, so a
    # strided one must be packed first, not read as if it were contiguous.
    x, _, _, dy = _inputs((9, 40), torch.float32)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(80, generator=g)[::2]
    b = torch.randn(40, 3, generator=g)[:, 1]
    assert not w.is_contiguous() and not b.is_contiguous()
    _check(x, w, b, dy)


def test_ops_called_directly_pack_their_inputs():
    x = torch.randn(5, 16)
    w = torch.randn(32)[::2]
    y, mean, rstd = torch.ops.nanofast.layer_norm_fwd(x, w, None, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (16,), w))
    dy = torch.randn(5, 16)
    dx, dw, _ = torch.ops.nanofast.layer_norm_bwd(dy, x, w, mean[::1], rstd, True, False)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.layer_norm(xr, (16,), wr).backward(dy)
    torch.testing.assert_close(dx, xr.grad)
    torch.testing.assert_close(dw, wr.grad)
