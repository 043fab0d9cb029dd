import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from parity import assert_parity


def _run(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 15, 17, 1000, 70001])
def test_parity(n, dtype, isa):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    ours, theirs = _run(ops.gelu, x, dy), _run(F.gelu, x, dy)
    ref = _run(F.gelu, x.double(), dy.double())
    for name, o, t, r in zip(["y", "dx"], ours, theirs, ref):
        assert_parity(name, o, t, r)


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


def test_gradcheck_float64():
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.gelu, (x,))


def test_bad_input():
    with pytest.raises(NotImplementedError, match="approximate='tanh' is not supported"):
        ops.gelu(torch.randn(3), approximate="tanh")
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        ops.gelu(torch.arange(3))


def test_opcheck():
    from torch.library import opcheck

    x = torch.randn(5, 7, requires_grad=True)
    opcheck(torch.ops.nanofast.gelu_fwd.default, (x,))
    opcheck(torch.ops.nanofast.gelu_bwd.default, (torch.randn(5, 7), x.detach()))


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
