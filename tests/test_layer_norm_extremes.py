"""LayerNorm at its numerical extremes, on both backends: a normalized size of 1 (the answer is exactly
the bias), rows whose sums overflow float32, and rows of up to 2^28 elements (within float32 rounding
of float64). The ordinary widths are tested in test_ops_layer_norm.py and test_triton_kernels.py."""
import pytest
import torch
import torch.nn.functional as F

import nanofast
import nanofast.kernels as K
from nanofast import ops
from nanofast.testing import ATOL, FACTOR, assert_parity

# the Triton kernels run on CUDA where there is a GPU, else on CPU tensors through Triton's interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_leaves(*ts):
    return _leaves(*(None if t is None else t.to(TRITON_DEVICE) for t in ts))

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
        xl, wl, bl = _triton_leaves(x, w, b)
        y = K.layer_norm(xl, (1,), wl, bl, 1e-5)
        y.backward(dy.to(TRITON_DEVICE))
        _assert_size_one_exact(y.detach().cpu(), xl.grad.cpu(), x, b, f"Triton {tuple(x.shape)} w={w is not None}")


def _overflowing_rows(C, kind, seed=0):
    """(4, C) float32 rows; rows 0 and 2 are finite but overflow float32 arithmetic, 1 and 3 are ordinary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, C, generator=g, dtype=torch.float64) * 2 + 0.5
    if kind == "sum":  # |x| near 1e36, one sign: the row's sum overflows
        huge = (torch.randn(2, C, generator=g, dtype=torch.float64) * 0.5 + 3) * 1e36
    elif kind == "deviation":  # values near +-3e38 around a mean near 1.2e38: x - mean overflows
        sign = torch.where(torch.rand(2, C, generator=g) < 0.7, 1.0, -1.0).double()
        huge = sign * (3e38 - torch.rand(2, C, generator=g, dtype=torch.float64) * 1e37)
    else:  # deviations near 1e20: only the sum of their squares overflows
        huge = torch.randn(2, C, generator=g, dtype=torch.float64) * 1e20
    x[0::2] = huge
    w, b = (torch.randn(C, generator=g, dtype=torch.float64) for _ in range(2))
    dy = torch.randn(4, C, generator=g, dtype=torch.float64)
    return x.float(), w.float(), b.float(), dy.float()


def _per_row_scale(x):
    """2^-e per row with max|x| in [2^(e-1), 2^e): rows times it are exact and of order 1."""
    _, e = torch.frexp(x.double().abs().amax(-1, keepdim=True))
    return torch.ldexp(torch.ones_like(e, dtype=torch.float64), -e)


def _check_against_scaled_rows(run, x, w, b, dy, eps=1e-5):
    """Checks run(x, w, b, dy, eps) -> (y, dx, dw, db) by the parity rule against float64 and torch's
    float32 on the rows scaled to order 1 (LayerNorm is scale-invariant; torch gives NaN on the rows
    themselves). dx is compared in the scaled rows' units."""
    s = _per_row_scale(x)
    ours = run(x, w, b, dy, eps)
    ref = _run_torch(x.double() * s, w.double(), b.double(), dy.double(), eps * s * s)
    torch32 = _run_torch((x.double() * s).float(), w, b, dy, (eps * s * s).float())
    for name, o, t, r, unit in zip(["y", "dx", "dweight", "dbias"], ours, torch32, ref, [1, 1 / s, 1, 1]):
        assert_parity(name, (o.double() * unit).float() if name == "dx" else o, t, r)


def _run_torch(x, w, b, dy, eps):
    """F.layer_norm row by row (eps differs per row), forward and backward."""
    xl, wl, bl = _leaves(x, w, b)
    y = torch.cat([F.layer_norm(xl[i:i + 1], xl.shape[-1:], wl, bl, float(eps[i])) for i in range(len(x))])
    y.backward(dy)
    return y.detach(), xl.grad, wl.grad, bl.grad


def _run_layer_norm(x, w, b, dy, eps):
    xl, wl, bl = _leaves(x, w, b)
    y = ops.layer_norm(xl, x.shape[-1:], wl, bl, eps)
    y.backward(dy)
    return y.detach(), xl.grad, wl.grad, bl.grad


def _run_add_layer_norm(x, w, b, dy, eps):
    xl, rl, wl, bl = _leaves(x, torch.zeros_like(x), w, b)
    h, y = ops.add_layer_norm(xl, rl, x.shape[-1:], wl, bl, eps)
    y.backward(dy)
    assert torch.equal(rl.grad, xl.grad)
    return y.detach(), xl.grad, wl.grad, bl.grad


@pytest.mark.parametrize("kind", ["sum", "deviation", "squares"])
@pytest.mark.parametrize("C", [128, 1000, 3 * 4096 + 5])  # the register row, the flat one, blocked sums
@pytest.mark.parametrize("run", [_run_layer_norm, _run_add_layer_norm], ids=["layer_norm", "add_layer_norm"])
def test_overflowing_rows_are_normalised(run, C, kind, isa):
    # Normalising is scale-invariant: a finite row whose sums overflow float32 is taken in its own
    # power-of-two scale (mean, variance, output and the backward's row means), not returned as NaN.
    _check_against_scaled_rows(run, *_overflowing_rows(C, kind))


def test_rows_with_inf_or_nan_still_give_nan():
    x = torch.full((3, 128), 1e36)
    x[0, 5], x[1, 7], x[2, 9] = float("inf"), float("nan"), -float("inf")
    assert ops.layer_norm(x, (128,)).isnan().all(dim=1).all()
    assert ops.add_layer_norm(x, torch.zeros_like(x), (128,))[1].isnan().all(dim=1).all()


def _chunked_errors(C, outputs, x, w, b, dy, eps=1e-5, chunk=1 << 24):
    """max|t - float64 reference| for t in outputs = (y, dx, dweight, dbias) of one row (1, C), the
    reference computed a chunk of the row at a time so that no float64 copy of the row is needed."""
    def chunks(*ts):
        for c0 in range(0, C, chunk):
            yield [t.reshape(-1)[c0:c0 + chunk].double() for t in ts]
    mean = sum(xc.sum().item() for (xc,) in chunks(x)) / C
    var = sum(((xc - mean) ** 2).sum().item() for (xc,) in chunks(x)) / C
    rstd = 1.0 / (var + eps) ** 0.5
    sum_g = sum_gx = 0.0
    for xc, wc, dyc in chunks(x, w, dy):
        g = dyc * wc
        sum_g += g.sum().item()
        sum_gx += (g * (xc - mean) * rstd).sum().item()
    errors = [0.0] * 4
    for xc, wc, bc, dyc, *outs in chunks(x, w, b, dy, *outputs):
        xhat = (xc - mean) * rstd
        refs = [xhat * wc + bc, rstd * (dyc * wc - sum_g / C - xhat * sum_gx / C), dyc * xhat, dyc]
        errors = [max(e, (o - r).abs().max().item()) for e, o, r in zip(errors, outs, refs)]
    return errors


@pytest.mark.slow
def test_row_of_2_to_the_28():
    # One row of 2^28 float32 elements (1 GiB a tensor, about 16 GB at the peak), forward and backward:
    # within the parity rule of torch's float32 (2x its error plus the float32 slack) against float64.
    C = 1 << 28
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, C, generator=g) * 2 + 0.5
    w, b, dy = torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(1, C, generator=g)
    found = {}
    for name, fn in [("ours", ops.layer_norm), ("torch", F.layer_norm)]:
        xl, wl, bl = _leaves(x, w, b)
        y = fn(xl, (C,), wl, bl, 1e-5)
        y.backward(dy)
        found[name] = _chunked_errors(C, (y.detach(), xl.grad, wl.grad, bl.grad), x, w, b, dy)
        del xl, wl, bl, y
    print(f"\n2^28 row, max error vs float64 (y, dx, dweight, dbias): ours {found['ours']}, torch {found['torch']}")
    for name, ours, theirs in zip(["y", "dx", "dweight", "dbias"], found["ours"], found["torch"]):
        assert ours <= FACTOR * theirs + ATOL[torch.float32], (name, ours, theirs)


def _run_triton(x, w, b, dy, eps):
    xl, wl, bl = _triton_leaves(x, w, b)
    y = K.layer_norm(xl, x.shape[-1:], wl, bl, eps)
    y.backward(dy.to(TRITON_DEVICE))
    return tuple(t.cpu() for t in (y.detach(), xl.grad, wl.grad, bl.grad))


@pytest.mark.parametrize("kind", ["sum", "deviation", "squares"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes the overflowing plain sums
@pytest.mark.parametrize("C", [37, 300])  # one block in registers; the wide path (blocks of 64 here)
def test_overflowing_rows_triton(C, kind):
    _check_against_scaled_rows(_run_triton, *_overflowing_rows(C, kind))


def test_triton_wide_row_sums_are_blocked():
    # A constant row is its own mean, and any rounding error of the mean comes out times 1/sqrt(eps).
    # Blocks of 4 columns make 256 blocks in a row of 1024: an accumulator carried along them all
    # (the old flat sum) left y - bias = 2.6e-3; summed in super-blocks combined by trees, a fraction.
    x = torch.full((1, 1024), 3.7)
    b = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    y, mean, rstd = K.layer_norm_forward(x.to(TRITON_DEVICE), None, b.to(TRITON_DEVICE), 1e-5, block_n=4, block_m=1)
    assert (y.cpu() - b).abs().max() < 2e-4
