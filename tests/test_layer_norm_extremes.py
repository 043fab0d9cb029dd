"""LayerNorm at its numerical extremes, on both backends: a normalized size of 1 (the answer is exactly
the bias), rows whose sums overflow float32, and rows of up to 2^28 elements (within float32 rounding
of float64). The ordinary widths are tested in test_ops_layer_norm.py and test_triton_kernels.py."""
import pytest
import torch
import torch.nn.functional as F

import nanofast
import nanofast.kernels as K
from nanofast import ops

# (leading shape of the rows, whether the input is a strided view): many rows, 3-D, non-contiguous
SIZE_ONE_SHAPES = [((1,), False), ((7,), False), ((1000,), False), ((3, 17), False), ((2, 129), True)]
SIZE_ONE_SCALES = [(1e-6, 0.0), (1.0, 0.0), (1e6, 0.0), (1e-3, 123.25), (1.0, 1e4)]


def _size_one_cases(dtype, seed=0):
    """(x, weight, bias, dy) at C = 1 over shapes, input scales and offsets, with and without parameters."""
    g = torch.Generator().manual_seed(seed)
    for lead, strided in SIZE_ONE_SHAPES:
        for scale, offset in SIZE_ONE_SCALES:
            for affine, bias in [(False, False), (True, False), (False, True), (True, True)]:
                x = torch.randn(*lead, 3 if strided else 1, generator=g, dtype=torch.float64) * scale + offset
                x = x[..., 1:2] if strided else x
                w = torch.randn(1, generator=g, dtype=torch.float64) * 2 if affine else None
                b = torch.randn(1, generator=g, dtype=torch.float64) if bias else None
                dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
                case = tuple(None if t is None else t.to(dtype) for t in (x, w, b, dy))
                if case[0].isfinite().all():  # (float16 holds no 1e6)
                    yield case


def _assert_size_one_exact(y, dx, x, b, label):
    # torch.equal: bitwise up to the sign of zero, which torch's own result does not fix either
    expected = torch.zeros_like(y) if b is None else b.expand(y.shape)
    assert torch.equal(y, expected), f"{label}: y - bias up to {(y.double() - expected.double()).abs().max():.3g}"
    assert torch.equal(dx, torch.zeros_like(dx)), f"{label}: dx up to {dx.double().abs().max():.3g}"


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_size_one_is_exactly_the_bias(dtype, isa):
    # With one element the row is its own mean: y = bias and dx = 0 exactly (torch's bfloat16 is off by
    # the rounding of its mean). The FMA
    # builds once contracted dy * w - mean(dy * w) into one rounding, leaving dx = rstd * (the product's
    # rounding error), up to 1e-4 at eps = 1e-5.
    for x, w, b, dy in _size_one_cases(dtype):
        xl, wl, bl = _leaves(x, w, b)
        y = ops.layer_norm(xl, (1,), wl, bl, 1e-5)
        y.backward(dy)
        _assert_size_one_exact(y.detach(), xl.grad, x, b, f"layer_norm {tuple(x.shape)} w={w is not None}")

        xl, rl, wl, bl = _leaves(x, torch.randn_like(x), w, b)
        h, y = ops.add_layer_norm(xl, rl, (1,), wl, bl, 1e-5)
        y.backward(dy)
        _assert_size_one_exact(y.detach(), xl.grad, x, b, f"add_layer_norm {tuple(x.shape)} w={w is not None}")
        assert torch.equal(rl.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_size_one_modules_and_compile(dtype):
    # the modules (float16 goes to torch's kernel on the CPU) and a compiled graph (the custom ops)
    x, _, _, dy = next(c for c in _size_one_cases(dtype) if c[0].shape == (7, 1))
    norm = nanofast.nn.LayerNorm(1).to(dtype)
    with torch.no_grad():
        norm.weight.fill_(1.7)
        norm.bias.fill_(-0.3)
    for fn in [norm, torch.compile(norm, fullgraph=True, backend="aot_eager")]:
        (xl,) = _leaves(x)
        y = fn(xl)
        y.backward(dy)
        _assert_size_one_exact(y.detach(), xl.grad, x, norm.bias.detach(), f"{type(fn).__name__}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_size_one_triton(dtype):
    for x, w, b, dy in list(_size_one_cases(dtype))[::3]:  # the interpreter is slow: a third of them
        xl, wl, bl = _leaves(x, w, b)
        y = K.layer_norm(xl, (1,), wl, bl, 1e-5)
        y.backward(dy)
        _assert_size_one_exact(y.detach(), xl.grad, x, b, f"Triton {tuple(x.shape)} w={w is not None}")
