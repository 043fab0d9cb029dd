"""nanofast.ops.add_layer_norm: (x + residual, layer_norm(x + residual)) against torch's add and
F.layer_norm, for the sum, the normalised rows and every gradient, in every dtype combination the fused
kernel takes (and the composed fallback for the others)."""
import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from nanofast.testing import assert_parity

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
# (x, residual, out) dtypes of the fused CPU kernel
FUSED = [(F32, F32, F32), (F32, BF16, F32), (F32, F32, BF16), (F32, BF16, BF16), (BF16, BF16, BF16), (F64, F64, F64)]


def _inputs(shape, dtypes, affine=True, bias=True, seed=0):
    xd, rd, yd = dtypes
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    x, r = (rnd(shape) * 2 + 0.5).to(xd), rnd(shape).to(rd)
    w = rnd(C).to(xd) if affine else None
    b = rnd(C).to(xd) if bias else None
    dh, dy = rnd(shape).to(xd), rnd(shape).to(yd)
    return x, r, w, b, dh, dy


def _unfused(x, r, shape, w, b, eps, out_dtype):
    h = x + r
    return h, F.layer_norm(h, shape, w, b, eps).to(out_dtype)


def _ours(x, r, shape, w, b, eps, out_dtype):
    return ops.add_layer_norm(x, r, shape, w, b, eps, out_dtype=out_dtype)


def _run(fn, x, r, w, b, dh, dy, out_dtype, use_h=True):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    h, y = fn(leaves[0], leaves[1], (x.shape[-1],), leaves[2], leaves[3], 1e-5, out_dtype)
    assert h.dtype == x.dtype and y.dtype == out_dtype
    torch.autograd.backward([h, y] if use_h else [y], [dh, dy] if use_h else [dy])
    return [h.detach(), y.detach()] + [t.grad for t in leaves if t is not None]


def _check(x, r, w, b, dh, dy, out_dtype, use_h=True):
    ours = _run(_ours, x, r, w, b, dh, dy, out_dtype, use_h)
    theirs = _run(_unfused, x, r, w, b, dh, dy, out_dtype, use_h)
    ref = _run(_unfused, *(t.double() if t is not None else None for t in (x, r, w, b, dh, dy)), F64, use_h)
    names = ["h", "y", "dx", "dresidual", "dweight", "dbias"]
    for name, o, t, rr in zip(names, ours, theirs, ref):
        assert o.dtype == t.dtype, f"{name}: {o.dtype} != torch's {t.dtype}"
        assert_parity(name, o, t, rr)


@pytest.mark.parametrize("dtypes", FUSED, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("C", [1, 7, 63, 128, 384, 1000])
def test_parity(C, dtypes, isa):
    x, r, w, b, dh, dy = _inputs((37, C), dtypes)
    _check(x, r, w, b, dh, dy, dtypes[2])


@pytest.mark.parametrize("C", [2**20, 2**22])
def test_long_row_parity(C):
    # the fused kernel's own row sums must be blocked as layer_norm's are
    x, r, w, b, dh, dy = _inputs((1, C), (F32, F32, F32))
    _check(x, r, w, b, dh, dy, F32)


@pytest.mark.parametrize("C", [128, 1000])
def test_huge_values_are_normalised(C):
    # |h| near 1e20: the squared deviations overflow float32; normalising is scale-invariant
    x, r, w, b, dh, dy = _inputs((4, C), (F32, F32, F32))
    x, r = x * 1e20, r * 1e20
    ours = _run(_ours, x, r, w, b, dh, dy, F32)
    h, *_ = ours
    ref = _run(_unfused, h.double(), torch.zeros_like(h, dtype=F64), w.double(), b.double(), dh.double(),
               dy.double(), F64)
    names = ["h", "y", "dx", "dresidual", "dweight", "dbias"]
    for name, o, rr, scale in zip(names, ours, ref, [1e-20, 1, 1, 1, 1, 1]):
        torch.testing.assert_close(o.double() * scale, rr * scale, rtol=1e-5, atol=1e-5, msg=name)


def test_the_sum_used_only_by_the_norm():
    # a last block's sum feeds ln_f alone: h gets no gradient of its own
    x, r, w, b, dh, dy = _inputs((9, 64), (F32, BF16, BF16))
    _check(x, r, w, b, dh, dy, BF16, use_h=False)


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False), (False, True)])
def test_optional_weight_and_bias(affine, bias):
    x, r, w, b, dh, dy = _inputs((5, 3, 96), (F32, F32, F32), affine, bias)
    _check(x, r, w, b, dh, dy, F32)


def test_3d_and_non_contiguous():
    x, r, w, b, dh, dy = _inputs((4, 50, 256), (F32, BF16, BF16))
    x, r = x[:, :, ::2], r.transpose(0, 1).contiguous().transpose(0, 1)[:, :, 1::2]  # strided views
    dh, dy = dh[:, :, :128], dy[:, :, :128]
    _check(x, r, w[:128], b[:128], dh, dy, BF16)


def test_composed_fallback_for_other_dtype_combinations():
    # bfloat16 rows with a float32 output: not a fused combination, composed from torch's add and the
    # LayerNorm kernel, with the same results
    x, r, w, b, dh, dy = _inputs((11, 40), (BF16, BF16, F32))
    _check(x, r, w, b, dh, dy, F32)
    # and with leading dimensions permuted (the add follows the inputs' strides)
    x, r, w, b, dh, dy = _inputs((5, 4, 40), (BF16, BF16, F32))
    _check(x.transpose(0, 1), r.transpose(0, 1), w, b, dh.transpose(0, 1), dy.transpose(0, 1), F32)


def test_gradcheck_float64():
    x, r, w, b = (torch.randn(s, dtype=F64, requires_grad=True) for s in ((4, 6), (4, 6), (6,), (6,)))

    def fn(x, r, w, b):
        h, y = ops.add_layer_norm(x, r, (6,), w, b)
        return h * 0.5, y  # both outputs, so dh and dy both flow

    assert torch.autograd.gradcheck(fn, (x, r, w, b))


def test_deterministic_and_thread_independent():
    x, r, w, b, dh, dy = _inputs((1000, 384), (F32, BF16, BF16))
    threads = torch.get_num_threads()
    try:
        first = _run(_ours, x, r, w, b, dh, dy, BF16)
        again = _run(_ours, x, r, w, b, dh, dy, BF16)
        torch.set_num_threads(1)
        single = _run(_ours, x, r, w, b, dh, dy, BF16)
    finally:
        torch.set_num_threads(threads)
    for a, b2, c in zip(first, again, single):
        assert torch.equal(a, b2) and torch.equal(a, c)


@pytest.mark.parametrize("dtypes", [(F32, F32, F32), (F32, BF16, BF16)], ids=["float32", "float32-bf16-bf16"])
def test_streamed_outputs_parity_and_rows(dtypes):
    """At a size whose float32 outputs (y, dx, dresidual) are streamed past the cache (16 MiB and
    more): parity with float64, and each row's bits the same as in a small tensor, whose stores are
    plain."""
    x, r, w, b, dh, dy = _inputs((1, 8193, 512), dtypes)
    _check(x, r, w, b, dh, dy, dtypes[2])
    big = _run(_ours, x, r, w, b, dh, dy, dtypes[2])
    rows = slice(8193 - 70, 8193)
    small = _run(_ours, x[:, rows], r[:, rows], w, b, dh[:, rows], dy[:, rows], dtypes[2])
    for name, o, s in zip(["h", "y", "dx", "dresidual"], big, small):
        assert torch.equal(o[:, rows], s), name


def test_empty():
    x, r = torch.randn(0, 16, requires_grad=True), torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    h, y = ops.add_layer_norm(x, r, (16,), w)
    assert h.shape == y.shape == (0, 16)
    (h.sum() + y.sum()).backward()
    assert torch.equal(w.grad, torch.zeros(16)) and r.grad.shape == (0, 16)


def test_nan_propagates_like_torch():
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    r[1, 3] = float("nan")
    (h, y), (h2, y2) = ops.add_layer_norm(x, r, (32,)), _unfused(x, r, (32,), None, None, 1e-5, F32)
    assert torch.equal(torch.isnan(h), torch.isnan(h2)) and torch.equal(torch.isnan(y), torch.isnan(y2))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.add_layer_norm(torch.randn(3, 4), torch.randn(3, 5), (4,)), r"residual has shape \(3, 5\).*\(3, 4\)"),
    (lambda: ops.add_layer_norm(torch.randn(3, 4), torch.randn(1, 4), (4,)), "no broadcasting"),
    (lambda: ops.add_layer_norm(torch.randn(3, 4, dtype=BF16), torch.randn(3, 4), (4,)), "would promote"),
    (lambda: ops.add_layer_norm(torch.randn(3, 4), torch.randn(3, 4).half(), (4,)), "residual has dtype torch.float16"),
    (lambda: ops.add_layer_norm(torch.randn(3, 4), torch.randn(3, 4), (5,)), r"normalized_shape \(5,\)"),
    (lambda: ops.add_layer_norm(torch.randn(3, 4), torch.randn(3, 4), (4,), torch.randn(5)), r"weight has shape"),
    (lambda: ops.add_layer_norm(torch.randn(3, 4), torch.randn(3, 4), (4,), out_dtype=torch.int32), "out_dtype"),
    (lambda: ops.add_layer_norm(torch.randn(3, 4), [1.0], (4,)), "residual must be a torch.Tensor"),
])
def test_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_opcheck():
    from torch.library import opcheck

    x, r, w, b, dh, dy = _inputs((6, 40), (F32, BF16, BF16))
    opcheck(torch.ops.nanofast.add_layer_norm_fwd.default,
            (x.requires_grad_(), r.requires_grad_(), w.requires_grad_(), b, 1e-5, BF16))
    h, y, mean, rstd = torch.ops.nanofast.add_layer_norm_fwd(x.detach(), r.detach(), w.detach(), b, 1e-5, BF16)
    opcheck(torch.ops.nanofast.add_layer_norm_bwd.default, (dy, dh, h, w.detach(), mean, rstd, BF16, True, False))
    opcheck(torch.ops.nanofast.add_layer_norm_bwd.default, (dy, None, h, None, mean, rstd, F32, False, False))


def test_compiled_matches_eager():
    x, r, w, b, dh, dy = _inputs((8, 64), (F32, F32, F32))
    compiled = torch.compile(_ours, fullgraph=True, backend="aot_eager")
    eager = _run(_ours, x, r, w, b, dh, dy, F32)
    graph = _run(compiled, x, r, w, b, dh, dy, F32)
    for a, c in zip(eager, graph):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_triton_launchers_compose_the_same_op():
    # CUDA tensors run the composed path on Triton's LayerNorm: on the GPU where there is one, else
    # through Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 without CUDA)
    pytest.importorskip("triton", reason="triton is not installed (pip install 'nanofast[test]')")
    from nanofast.ops import cuda
    from nanofast.ops.add_layer_norm import _EagerAddLayerNorm

    def through_triton(x, r, shape, w, b, eps, out_dtype):
        return _EagerAddLayerNorm.apply(x, r, w, b, eps, out_dtype, cuda)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, r, w, b, dh, dy = (t.to(device) for t in _inputs((6, 40), (F32, BF16, BF16)))
    ours = _run(through_triton, x, r, w, b, dh, dy, BF16)
    theirs = _run(_unfused, x, r, w, b, dh, dy, BF16)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtypes", [(F32, F32, F32), (F32, BF16, BF16), (BF16, BF16, BF16)],
                         ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_cuda_parity(dtypes):
    x, r, w, b, dh, dy = (t.cuda() for t in _inputs((64, 4, 384), dtypes))
    _check(x, r, w, b, dh, dy, dtypes[2])
