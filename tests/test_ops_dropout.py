"""nanofast.ops.dropout and nanofast.nn.Dropout: seeded counter-based dropout on the CPU."""
import pytest
import torch

import nanofast
from nanofast import ops
from nanofast.ops import cpu
from nanofast.ops.dropout import dropout_fwd


def _expected(x, p, seed):
    """x * keep / (1 - p) in the accumulation dtype, keep from the generator at each element's offset."""
    keep = cpu.dropout_mask(seed, 1, 1, 1, x.numel(), p).view(x.shape)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    one = torch.tensor(1.0, dtype=acc)
    scale = one / (one - torch.tensor(p, dtype=acc))
    return torch.where(keep, x.to(acc) * scale, torch.zeros((), dtype=acc)).to(x.dtype), keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 17, 4097, 100003])
def test_values_and_mask(n, dtype, isa):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    seed = torch.tensor([2 ** 61 + n])
    out = dropout_fwd(x, 0.3, seed)
    expected, _ = _expected(x, 0.3, int(seed))
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    torch.manual_seed(0)
    y = ops.dropout(torch.ones(1_000_000), p)
    assert abs((y != 0).double().mean().item() - (1 - p)) < 0.01 * (1 - p) + 1e-3
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))


def test_gradient_uses_the_forward_mask():
    torch.manual_seed(3)
    x = torch.randn(64, 48, requires_grad=True)
    y = ops.dropout(x, 0.25)
    dy = torch.randn(64, 48)
    (dx,) = torch.autograd.grad(y, x, dy)
    keep = y != 0
    assert torch.equal(dx, torch.where(keep, dy * (1 / torch.tensor(0.75)), torch.zeros(())))


def test_gradcheck_float64():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([12345])
    assert torch.autograd.gradcheck(lambda t: dropout_fwd(t, 0.4, seed), (x,))


def test_reproducible_and_seeded():
    x = torch.randn(1000)
    torch.manual_seed(7)
    a = ops.dropout(x, 0.5)
    torch.manual_seed(7)
    b = ops.dropout(x, 0.5)
    c = ops.dropout(x, 0.5)  # the next seed
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_identity_zeros_and_shapes():
    x = torch.randn(4, 6, 8)
    assert ops.dropout(x, 0.0) is x and ops.dropout(x, 0.7, training=False) is x
    assert not ops.dropout(x, 1.0).any()
    y = ops.dropout(x.transpose(0, 2), 0.5)  # a non-contiguous view: its shape kept
    assert y.shape == (8, 6, 4) and torch.equal(y != 0, y.contiguous() != 0)
    empty = torch.empty(0, 3)
    assert ops.dropout(empty, 0.5).shape == (0, 3)


def test_nan_kept_where_kept():
    torch.manual_seed(1)
    x = torch.full((1000,), float("nan"))
    y = ops.dropout(x, 0.5)
    assert torch.isnan(y).sum() > 0 and (y[~torch.isnan(y)] == 0).all()


def test_bad_input():
    with pytest.raises(ValueError, match="p must be in"):
        ops.dropout(torch.randn(3), 1.5)
    with pytest.raises(ValueError, match="p must be in"):
        ops.dropout(torch.randn(3), -0.1)
    with pytest.raises(TypeError, match="input"):
        ops.dropout(torch.arange(3), 0.5)


def test_opcheck():
    x = torch.randn(8, 16, requires_grad=True)
    torch.library.opcheck(dropout_fwd, (x, 0.3, torch.tensor([99])))


def test_module():
    m = nanofast.nn.Dropout(0.4)
    x = torch.randn(100, 10)
    torch.manual_seed(5)
    y = m(x)
    torch.manual_seed(5)
    assert torch.equal(y, ops.dropout(x, 0.4))
    assert torch.equal(m.eval()(x), x)
    assert isinstance(m, torch.nn.Dropout)
