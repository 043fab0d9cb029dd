import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from nanofast.testing import assert_parity


def _run(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 15, 17, 1000, 70001])
def test_parity(n, dtype, approximate, isa):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    ours = _run(lambda x: ops.gelu(x, approximate=approximate), x, dy)
    theirs = _run(lambda x: F.gelu(x, approximate=approximate), x, dy)
    ref = _run(lambda x: F.gelu(x, approximate=approximate), x.double(), dy.double())
    for name, o, t, r in zip(["y", "dx"], ours, theirs, ref):
        assert_parity(f"{approximate} {name}", o, t, r)


def test_tanh_far_from_zero():
    # 1 + tanh(z) for z near -inf loses every digit; gelu is computed as x * sigmoid(2z) instead, so
    # the negative tail keeps its relative accuracy, and the positive tail gives x and a slope of 1
    x = torch.tensor([-9.0, -7.0, -5.0, -1.0, 5.0, 9.0, 30.0, 1e30], requires_grad=True)
    y = ops.gelu(x, approximate="tanh")
    (dx,) = torch.autograd.grad(y.sum(), x)
    xr = x.detach().double().requires_grad_()
    # the same function in float64 without the cancellation (torch's float64 gives 0 below x = -8)
    yr = xr * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (xr + 0.044715 * xr ** 3))
    (dxr,) = torch.autograd.grad(yr[:-1].sum(), xr)
    torch.testing.assert_close(y[:-1].double(), yr[:-1], rtol=1e-5, atol=0)
    torch.testing.assert_close(dx[:-1].double(), dxr[:-1], rtol=1e-5, atol=0)
    assert y[-1] == 1e30
    assert ops.gelu(torch.tensor([-30.0, -1e30]), approximate="tanh").tolist() == [0.0, 0.0]  # underflows to -0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 17, 1000, 70001])
def test_saved_derivative_gives_the_backward_bit_for_bit(n, dtype, isa):
    """The forward that keeps gelu'(x) (nanofast.fused_block's) returns gelu(x) as the plain forward does,
    and dy * (kept gelu') equals the backward computed from x, NaN and infinities included."""
    from nanofast.ops import cpu

    g = torch.Generator().manual_seed(n + 1)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    x[0] = float("nan")
    if n > 2:
        x[1], dy[2] = float("inf"), float("-inf")
    y, grad = cpu.gelu_forward_saving_grad(x)
    assert grad.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(y.view(-1).view(torch.uint8), cpu.gelu_forward(x).view(-1).view(torch.uint8))
    dx = cpu.gelu_backward_from_grad(dy, grad)
    assert torch.equal(dx.view(-1).view(torch.uint8), cpu.gelu_backward(dy, x).view(-1).view(torch.uint8))
    # and the kept derivative is gelu'(x): Phi(x) + x phi(x), in float64
    x64 = x.double()[3:]
    exact = 0.5 * (1 + torch.erf(x64 / 2 ** 0.5)) + x64 * torch.exp(-x64 * x64 / 2) / (2 * torch.pi) ** 0.5
    torch.testing.assert_close(grad[3:].double(), exact, rtol=1e-5 if dtype != torch.float64 else 1e-12,
                               atol=1e-6 if dtype != torch.float64 else 1e-12)


def test_streamed_outputs():
    """4M + 37 float32 elements (16 MiB and more: the outputs and the kept derivative are written with
    streaming stores): parity with float64, and every element's bits as in a small tensor (plain stores),
    forward, backward and the saved-derivative pair."""
    from nanofast.ops import cpu

    n = (4 << 20) + 37
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g) * 3
    dy = torch.randn(n, generator=g)
    ours, theirs = _run(ops.gelu, x, dy), _run(F.gelu, x, dy)
    ref = _run(F.gelu, x.double(), dy.double())
    for name, o, t, r in zip(["y", "dx"], ours, theirs, ref):
        assert_parity(name, o, t, r)
    y, grad = cpu.gelu_forward_saving_grad(x)
    dx = cpu.gelu_backward_from_grad(dy, grad)
    assert torch.equal(y, ours[0]) and torch.equal(dx, ours[1])
    for part in (slice(0, 5000), slice(n - 5037, n)):  # the tail: a part chunk, a part vector
        y_s, grad_s = cpu.gelu_forward_saving_grad(x[part])
        assert torch.equal(y[part], y_s) and torch.equal(grad[part], grad_s)
        assert torch.equal(dx[part], cpu.gelu_backward(dy[part], x[part]))


def test_extremes_and_nan():
    x = torch.tensor([-1e30, -80.0, -10.0, -1e-30, 0.0, 1e-30, 10.0, 80.0, 1e30, float("inf"), float("-inf"),
                      float("nan")])
    ours, theirs = ops.gelu(x), F.gelu(x)
    assert ours[9] == float("inf")  # gelu(+inf) = +inf (torch 2.13 returns nan there)
    keep = torch.arange(12) != 9
    torch.testing.assert_close(ours[keep], theirs[keep], equal_nan=True)


def test_non_contiguous_and_shape_kept():
    x = torch.randn(6, 8, 10).transpose(0, 2)
    torch.testing.assert_close(ops.gelu(x), F.gelu(x))
    assert ops.gelu(x).shape == x.shape


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_float64(approximate):
    x = torch.randn(20, dtype=torch.float64, requires_grad=True) * 3
    assert torch.autograd.gradcheck(lambda x: ops.gelu(x, approximate=approximate), (x,))


def test_bad_input():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        ops.gelu(torch.randn(3), approximate="erf")
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        ops.gelu(torch.arange(3))


def test_opcheck():
    from torch.library import opcheck

    x = torch.randn(5, 7, requires_grad=True)
    opcheck(torch.ops.nanofast.gelu_fwd.default, (x,))
    opcheck(torch.ops.nanofast.gelu_bwd.default, (torch.randn(5, 7), x.detach()))
    # a transposed input: the fakes must give the launchers' contiguous outputs
    xt = torch.randn(7, 5).t().requires_grad_()
    opcheck(torch.ops.nanofast.gelu_fwd.default, (xt,))
    opcheck(torch.ops.nanofast.gelu_bwd.default, (torch.randn(7, 5).t(), xt.detach()))
    opcheck(torch.ops.nanofast.gelu_fwd.default, (xt, "tanh"))
    opcheck(torch.ops.nanofast.gelu_bwd.default, (torch.randn(7, 5).t(), xt.detach(), "tanh"))


def test_custom_ops_called_directly_pack_their_inputs():
    x = torch.randn(6, 8).t()
    dy = torch.randn(8, 6)[:, ::1].t().contiguous().t()  # transposed layout
    torch.testing.assert_close(torch.ops.nanofast.gelu_fwd(x), F.gelu(x))
    torch.testing.assert_close(torch.ops.nanofast.gelu_bwd(dy, x), torch.ops.aten.gelu_backward(dy, x))


def test_avx512bf16_rounds_like_the_other_builds():
    # The AVX512-BF16 build narrows float32 to bfloat16 with vcvtneps2bf16 instead of the shift-add
    # sequence: the same round-to-nearest-even and quiet NaNs, so the outputs must be bitwise equal
    # (float32 denormals aside, which it flushes to zero).
    from nanofast import _C

    if "avx512bf16" not in _C.available_isas().split(","):
        pytest.skip("this CPU has no AVX512-BF16")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4099, generator=g, dtype=torch.float64) * 4
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3e38], dtype=torch.float64)
    x = x.to(torch.bfloat16)
    dy = torch.randn(4099, generator=g).to(torch.bfloat16)
    results = {}
    try:
        for isa in ("avx512", "avx512bf16"):
            _C.select_isa(isa)
            fwd = ops.gelu(x)
            bwd = torch.ops.nanofast.gelu_bwd(dy, x)
            results[isa] = (fwd.view(torch.int16), bwd.view(torch.int16))
    finally:
        _C.select_isa("auto")
    for a, b in zip(results["avx512"], results["avx512bf16"]):
        assert torch.equal(a, b)
