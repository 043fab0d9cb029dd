"""nanofast.ops.swiglu and geglu: act(gate) * up against torch's activation and product in the same dtype
and in float64, for the output and both gradients."""
import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from nanofast.testing import assert_parity

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
# name: (ours, torch's)
GLUS = {
    "swiglu": (ops.swiglu, lambda g, u: F.silu(g) * u),
    "geglu": (ops.geglu, lambda g, u: F.gelu(g) * u),
    "geglu_tanh": (lambda g, u: ops.geglu(g, u, approximate="tanh"), lambda g, u: F.gelu(g, approximate="tanh") * u),
}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(shape, generator=g, dtype=F64)  # noqa: E731
    return (rnd() * 3).to(dtype), rnd().to(dtype), rnd().to(dtype)


def _run(fn, gate, up, dy):
    gate, up = (t.detach().clone().requires_grad_() for t in (gate, up))
    y = fn(gate, up)
    y.backward(dy)
    return y.detach(), gate.grad, up.grad


def _check(name, gate, up, dy):
    ours_fn, torch_fn = GLUS[name]
    ours = _run(ours_fn, gate, up, dy)
    theirs = _run(torch_fn, gate, up, dy)
    ref = _run(torch_fn, gate.double(), up.double(), dy.double())
    for what, o, t, r in zip(["y", "dgate", "dup"], ours, theirs, ref):
        assert o.dtype == t.dtype and o.shape == t.shape, what
        assert_parity(f"{name} {what}", o, t, r)


@pytest.mark.parametrize("name", GLUS)
@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("C", [1, 7, 64, 65, 1000, 1536])
def test_parity_widths(C, dtype, name, isa):
    _check(name, *_inputs((37, C), dtype))


@pytest.mark.parametrize("name", GLUS)
@pytest.mark.parametrize("N", [1, 7, 63, 65, 97, 257])
def test_parity_rows(N, name):
    # 257 rows of 129: past the 32768 elements where the work splits across threads, in chunks that
    # cut rows in the middle
    _check(name, *_inputs((N, 129), BF16))


def test_halves_of_one_projection_are_read_in_place():
    # a fused gate_up projection's halves: row stride 2C, no copy
    x = torch.randn(4, 9, 2 * 96)
    gate, up = x.chunk(2, dim=-1)
    dy = torch.randn(4, 9, 96)
    for name in GLUS:
        _check(name, gate, up, dy)


def test_non_contiguous_views():
    gate, up, dy = _inputs((8, 6, 40), F32)
    _check("swiglu", gate.transpose(0, 1), up.transpose(0, 1), dy.transpose(0, 1))  # permuted leading dims
    _check("geglu", gate[..., ::2], up[..., 1::2], dy[..., :20])  # strided last dimension: packed
    _check("swiglu", gate[:, 1:4], up.transpose(1, 2).contiguous().transpose(1, 2)[:, 1:4], dy[:, :3])


def test_deterministic_and_thread_independent():
    gate, up, dy = _inputs((300, 1000), F32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            runs.append(_run(ops.swiglu, gate, up, dy) + _run(ops.geglu, gate, up, dy))
    finally:
        torch.set_num_threads(threads)
    for first, *others in zip(*runs):
        assert all(torch.equal(first, o) for o in others)


@pytest.mark.parametrize("name", GLUS)
def test_gradcheck_float64(name):
    gate, up = (torch.randn(5, 7, dtype=F64, requires_grad=True) * 2 for _ in range(2))
    assert torch.autograd.gradcheck(GLUS[name][0], (gate.detach().requires_grad_(), up.detach().requires_grad_()))


def test_extremes_and_nan():
    g = torch.tensor([-1e30, -100.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 100.0, 1e30, float("nan")])
    u = torch.full_like(g, 2.0)
    for name, (ours, theirs) in GLUS.items():
        torch.testing.assert_close(ours(g, u), theirs(g, u), equal_nan=True, msg=name)


def test_only_one_gradient_wanted():
    gate, up, dy = _inputs((5, 16), F32)
    up.requires_grad_()
    y = ops.swiglu(gate, up)
    (dup,) = torch.autograd.grad(y, up, dy)
    torch.testing.assert_close(dup, dy * F.silu(gate))


def test_empty():
    gate = torch.randn(0, 8, requires_grad=True)
    y = ops.swiglu(gate, torch.randn(0, 8))
    y.sum().backward()
    assert y.shape == (0, 8) and gate.grad.shape == (0, 8)


def test_opcheck():
    from torch.library import opcheck

    gate, up, dy = _inputs((6, 40), F32)
    for act in ("silu", "gelu", "gelu_tanh"):
        opcheck(torch.ops.nanofast.glu_fwd.default, (gate.requires_grad_(), up.requires_grad_(), act))
        opcheck(torch.ops.nanofast.glu_bwd.default, (dy, gate.detach(), up.detach(), act))
    # transposed inputs (packed: the launchers read rows of a unit last stride) and rows with gaps
    gt, ut = torch.randn(40, 6).t(), torch.randn(40, 12)[:, ::2].t()
    opcheck(torch.ops.nanofast.glu_fwd.default, (gt, ut, "silu"))
    opcheck(torch.ops.nanofast.glu_bwd.default, (torch.randn(40, 6).t(), gt, torch.randn(6, 80)[:, 20:60], "gelu"))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.swiglu(torch.randn(3, 4), torch.randn(3, 5)), r"up has shape \(3, 5\) but gate has shape \(3, 4\)"),
    (lambda: ops.swiglu(torch.randn(3, 4), torch.randn(3, 4, dtype=F64)), "up has dtype torch.float64"),
    (lambda: ops.swiglu(torch.arange(4.0).long(), torch.randn(4)), "gate must be a floating-point tensor"),
    (lambda: ops.swiglu(torch.randn(3, 4).half(), torch.randn(3, 4).half()), "does not support"),
    (lambda: ops.geglu(torch.randn(3), torch.randn(3), approximate="erf"), "approximate must be 'none' or 'tanh'"),
    (lambda: ops.swiglu(torch.tensor(1.0), torch.tensor(2.0)), "at least one dimension"),
])
def test_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()
