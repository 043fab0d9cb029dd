"""nanofast.ops.rms_norm and add_rms_norm against the models' own code in the same dtype (torch's
F.rms_norm, Hugging Face's LlamaRMSNorm with its cast before the weight, Gemma's (1 + weight)) and a
float64 reference, for the output, the sum and every gradient."""
import pytest
import torch
import torch.nn.functional as F

import nanofast
from nanofast import ops
from nanofast.testing import assert_parity

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
EPS = 1e-6
# the three roundings: (weight_offset, cast_before_weight)
VARIANTS = {"torch": (0.0, False), "llama": (0.0, True), "gemma": (1.0, False)}
# (x, residual, out) dtypes of the fused CPU kernel
FUSED = [(F32, F32, F32), (F32, BF16, F32), (F32, F32, BF16), (F32, BF16, BF16), (BF16, BF16, BF16), (F64, F64, F64)]


def _model_rms_norm(x, w, eps, offset, cast):
    """What the models compute, in x's dtype: F.rms_norm; LlamaRMSNorm.forward; Gemma's RMSNorm.forward
    (statistics in float32 for 16-bit rows, float64 for the reference)."""
    acc = F64 if x.dtype == F64 else F32
    if offset:
        xf = x.to(acc)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + w.to(acc))).type_as(x)
    if cast:
        h = x.to(acc)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype) if w is not None else h.to(x.dtype)
    return F.rms_norm(x, x.shape[-1:], w, eps)


def _inputs(shape, dtypes=(F32, F32, F32), affine=True, seed=0):
    xd, rd, yd = dtypes
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    x, r = (rnd(shape) * 2 + 0.5).to(xd), rnd(shape).to(rd)
    w = (rnd(shape[-1]) * 0.5 + 1).to(xd) if affine else None
    return x, r, w, rnd(shape).to(xd), rnd(shape).to(yd)


def _run(fn, x, w, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def _check(x, w, dy, variant="torch", eps=EPS):
    offset, cast = VARIANTS[variant]
    ours = _run(lambda x, w: ops.rms_norm(x, x.shape[-1:], w, eps, weight_offset=offset, cast_before_weight=cast),
                x, w, dy)
    theirs = _run(lambda x, w: _model_rms_norm(x, w, eps, offset, cast), x, w, dy)
    ref = _run(lambda x, w: _model_rms_norm(x, w, eps, offset, cast), *(t.double() if t is not None else None
                                                                        for t in (x, w, dy)))
    for name, o, t, r in zip(["y", "dx", "dweight"], ours, theirs, ref):
        assert o.dtype == t.dtype, f"{name}: {o.dtype} != torch's {t.dtype}"
        assert_parity(f"{variant} {name}", o, t, r)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("C", [1, 7, 63, 64, 65, 128, 384, 1000, 4099])
def test_parity_widths(C, dtype, variant, isa):
    x, _, w, dy, _ = _inputs((37, C), (dtype,) * 3)
    _check(x, w, dy, variant)


@pytest.mark.parametrize("N", [1, 7, 63, 65, 97, 257])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_parity_rows(N, dtype):
    x, _, w, dy, _ = _inputs((N, 96), (dtype,) * 3)
    _check(x, w, dy, "llama")


@pytest.mark.parametrize("variant", ["torch", "llama"])
def test_without_weight(variant):
    x, _, _, dy, _ = _inputs((5, 3, 96), affine=False)
    _check(x, None, dy, variant)


def test_default_eps_is_torchs():
    x = torch.full((2, 4), 1e-3)
    for dtype in (F32, BF16, F64):
        torch.testing.assert_close(ops.rms_norm(x.to(dtype), (4,)), F.rms_norm(x.to(dtype), (4,)), rtol=0, atol=0)


def test_float32_variants_agree_bit_for_bit():
    # in float32 the cast before the weight rounds nothing: Llama's and torch's are the same function
    x, _, _, _, _ = _inputs((9, 200))
    w = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(1)) / 16  # (w - 1) + 1 is w exactly
    assert torch.equal(ops.rms_norm(x, (200,), w, EPS), ops.rms_norm(x, (200,), w, EPS, cast_before_weight=True))
    assert torch.equal(ops.rms_norm(x, (200,), w - 1, EPS, weight_offset=1.0), ops.rms_norm(x, (200,), w, EPS))


def test_non_contiguous_input_and_grad():
    x, _, w, dy, _ = _inputs((64, 256))
    _check(x[:, ::2], w[:128], dy.t().contiguous().t()[:, :128])  # a strided last dimension: packed
    big = torch.randn(8, 10, 2 * 96)
    _check(big[:, 2:7, :96], w[:96], torch.randn(8, 5, 96))  # row gaps, read in place
    _check(big.transpose(0, 1)[..., 96:], w[:96], torch.randn(10, 8, 96), "llama")  # permuted leading dims


def test_multi_dim_normalized_shape():
    x = torch.randn(6, 4, 5, dtype=F64, requires_grad=True)
    w = torch.randn(4, 5, dtype=F64, requires_grad=True)
    torch.testing.assert_close(ops.rms_norm(x, (4, 5), w, EPS), F.rms_norm(x, (4, 5), w, EPS), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, (4, 5), w, EPS), (x, w))


@pytest.mark.parametrize("C", [2**20])
def test_long_row_parity(C):
    x, _, w, dy, _ = _inputs((1, C))
    _check(x, w, dy)


@pytest.mark.parametrize("C", [128, 1000])
def test_huge_values_are_normalised(C):
    # |x| near 1e20: the squares overflow float32; normalising is scale-invariant (torch's float32 gives 0)
    x, _, w, dy, _ = _inputs((4, C))
    x = x * 1e20
    ours = _run(lambda x, w: ops.rms_norm(x, (C,), w, EPS), x, w, dy)
    ref = _run(lambda x, w: _model_rms_norm(x, w, EPS, 0.0, False), x.double(), w.double(), dy.double())
    for name, o, r, scale in zip(["y", "dx", "dweight"], ours, ref, [1, 1e20, 1]):
        torch.testing.assert_close(o.double() * scale, r * scale, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64(variant):
    offset, cast = VARIANTS[variant]
    x, w = torch.randn(4, 6, dtype=F64, requires_grad=True), torch.randn(6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: ops.rms_norm(x, (6,), w, EPS, weight_offset=offset, cast_before_weight=cast), (x, w))
    r = torch.randn(4, 6, dtype=F64, requires_grad=True)

    def add_fn(x, r, w):
        h, y = ops.add_rms_norm(x, r, (6,), w, EPS, weight_offset=offset, cast_before_weight=cast)
        return h * 0.5, y  # both outputs, so dh and dy both flow

    assert torch.autograd.gradcheck(add_fn, (x, r, w))


@pytest.mark.parametrize("shape", [(1000, 384), (3000, 200), (7, 3 * 4096 + 5)])
def test_deterministic_and_thread_independent(shape):
    x, r, w, dy, _ = _inputs(shape)
    threads = torch.get_num_threads()

    def run():
        return _run(lambda x, w: ops.rms_norm(x, shape[-1:], w, EPS), x, w, dy) + \
            _run(lambda x, w: ops.add_rms_norm(x, r, shape[-1:], w, EPS)[1], x, w, dy)

    try:
        first, again = run(), run()
        others = []
        for n in (1, 3):
            torch.set_num_threads(n)
            others.append(run())
    finally:
        torch.set_num_threads(threads)
    for a, b, *c in zip(first, again, *others):
        assert torch.equal(a, b) and all(torch.equal(a, ci) for ci in c)


def test_streamed_outputs_match_small_rows():
    x, _, w, dy, _ = _inputs((8193, 512))
    big = _run(lambda x, w: ops.rms_norm(x, (512,), w, EPS), x, w, dy)
    for rows in (slice(0, 64), slice(8193 - 70, 8193)):
        small = _run(lambda x, w: ops.rms_norm(x, (512,), w, EPS), x[rows], w, dy[rows])
        assert torch.equal(big[0][rows], small[0]) and torch.equal(big[1][rows], small[1])


def test_empty():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = ops.rms_norm(x, (16,), w)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16))


def test_nan_propagates_like_torch():
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    assert torch.equal(torch.isnan(ops.rms_norm(x, (32,))), torch.isnan(F.rms_norm(x, (32,))))


# ---- add + RMSNorm ----

def _add_run(fn, x, r, w, dh, dy, out_dtype, use_h=True):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w)]
    h, y = fn(*leaves, out_dtype)
    assert h.dtype == x.dtype and y.dtype == out_dtype
    torch.autograd.backward([h, y] if use_h else [y], [dh, dy] if use_h else [dy])
    return [h.detach(), y.detach()] + [t.grad for t in leaves if t is not None]


def _add_check(x, r, w, dh, dy, out_dtype, variant="llama", use_h=True):
    offset, cast = VARIANTS[variant]

    def ours(x, r, w, out_dtype):
        return ops.add_rms_norm(x, r, x.shape[-1:], w, EPS, out_dtype, weight_offset=offset, cast_before_weight=cast)

    def unfused(x, r, w, out_dtype):
        h = x + r
        return h, _model_rms_norm(h, w, EPS, offset, cast).to(out_dtype)

    got = _add_run(ours, x, r, w, dh, dy, out_dtype, use_h)
    theirs = _add_run(unfused, x, r, w, dh, dy, out_dtype, use_h)
    ref = _add_run(unfused, *(t.double() if t is not None else None for t in (x, r, w, dh, dy)), F64, use_h)
    for name, o, t, rr in zip(["h", "y", "dx", "dresidual", "dweight"], got, theirs, ref):
        assert o.dtype == t.dtype, f"{name}: {o.dtype} != torch's {t.dtype}"
        assert_parity(f"add {variant} {name}", o, t, rr)


@pytest.mark.parametrize("dtypes", FUSED, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("C", [1, 7, 63, 128, 576, 1000])
def test_add_parity(C, dtypes, isa):
    x, r, w, dh, dy = _inputs((37, C), dtypes)
    _add_check(x, r, w, dh, dy, dtypes[2])


@pytest.mark.parametrize("variant", VARIANTS)
def test_add_variants_and_rows(variant):
    for N in (1, 65, 257):
        _add_check(*_inputs((N, 96), (BF16,) * 3), BF16, variant)


def test_add_sum_used_only_by_the_norm():
    x, r, w, dh, dy = _inputs((9, 64), (F32, BF16, BF16))
    _add_check(x, r, w, dh, dy, BF16, use_h=False)


def test_add_3d_non_contiguous_and_without_weight():
    x, r, w, dh, dy = _inputs((4, 50, 256), (F32, BF16, BF16))
    x, r = x[:, :, ::2], r.transpose(0, 1).contiguous().transpose(0, 1)[:, :, 1::2]
    _add_check(x, r, w[:128], dh[:, :, :128], dy[:, :, :128], BF16)
    _add_check(x, r, None, dh[:, :, :128], dy[:, :, :128], BF16, "torch")


def test_add_composed_fallback_for_other_dtype_combinations():
    # combinations the fused CPU kernel does not take: torch's add and the RMSNorm kernel, same results
    _add_check(*_inputs((11, 40), (BF16, BF16, F32)), F32)
    _add_check(*_inputs((11, 40), (F64, F32, F64)), F64)
    x, r, w, dh, dy = _inputs((5, 4, 40), (BF16, BF16, F32))
    _add_check(x.transpose(0, 1), r.transpose(0, 1), w, dh.transpose(0, 1), dy.transpose(0, 1), F32)


def test_add_long_row_parity():
    _add_check(*_inputs((1, 2**20)), F32)


# ---- the module, the custom ops, bad input ----

@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's, on float16 rows
def test_module_is_drop_in():
    ref = torch.nn.RMSNorm(48, eps=1e-6)
    ours = nanofast.nn.RMSNorm(48, eps=1e-6)
    assert list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        ref.weight.normal_()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 48)
    torch.testing.assert_close(ours(x), ref(x))
    assert torch.equal(ours(x.half()), ref(x.half()))  # float16 on the CPU: torch's
    llama = nanofast.nn.RMSNorm(48, eps=1e-6, cast_before_weight=True)
    llama.load_state_dict(ref.state_dict())
    xb = x.bfloat16()
    # a float32 weight on bfloat16 rows (the kernels' dtypes differ): torch's functions, LlamaRMSNorm's result
    torch.testing.assert_close(llama(xb), _model_rms_norm(xb, ref.weight, 1e-6, 0.0, True), rtol=0, atol=0)
    llama.bfloat16()
    torch.testing.assert_close(llama(xb), _model_rms_norm(xb, ref.weight.bfloat16(), 1e-6, 0.0, True))
    gemma = nanofast.nn.RMSNorm(48, weight_offset=1.0)
    torch.testing.assert_close(gemma(x), F.rms_norm(x, (48,)))  # the weight starts at 0: a scale of 1
    assert "weight_offset=1.0" in repr(gemma)


def test_opcheck():
    from torch.library import opcheck

    x, r, w, dy, _ = _inputs((6, 40))
    for res in (None, r):
        opcheck(torch.ops.nanofast.rms_norm_fwd.default, (x.requires_grad_(), res, w.requires_grad_(), EPS, 0.0, True,
                                                          F32))
        h, y, rstd = torch.ops.nanofast.rms_norm_fwd(x.detach(), res, w.detach(), EPS, 0.0, False, F32)
        xs = x.detach() if res is None else h
        opcheck(torch.ops.nanofast.rms_norm_bwd.default, (dy, None, xs, w.detach(), rstd, 1.0, True,
                                                          None if res is None else F32, True))
    # a transposed input and a bfloat16 residual beside float32 rows
    xt = torch.randn(40, 6).t()
    opcheck(torch.ops.nanofast.rms_norm_fwd.default, (xt, r.bfloat16(), w.detach(), EPS, 0.0, False, BF16))
    h, y, rstd = torch.ops.nanofast.rms_norm_fwd(xt, r.bfloat16(), w.detach(), EPS, 0.0, False, BF16)
    opcheck(torch.ops.nanofast.rms_norm_bwd.default, (dy.bfloat16().t().contiguous().t(), dy, h, w.detach(), rstd,
                                                      0.0, False, BF16, False))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.rms_norm(torch.randn(3, 4), (5,)), r"normalized_shape \(5,\).*\(3, 4\)"),
    (lambda: ops.rms_norm(torch.randn(3, 4), (4,), torch.randn(5)), r"weight has shape \(5,\)"),
    (lambda: ops.rms_norm(torch.randn(3, 4), (4,), torch.randn(4, dtype=F64)), "weight has dtype"),
    (lambda: ops.rms_norm(torch.arange(12).view(3, 4), (4,)), "input must be a floating-point tensor"),
    (lambda: ops.rms_norm(torch.randn(3, 4).half(), (4,)), "does not support"),
    (lambda: ops.rms_norm([1.0, 2.0], (2,)), "input must be a torch.Tensor"),
    (lambda: ops.rms_norm(torch.randn(3, 4), (4,), eps=-1.0), "eps must be"),
    (lambda: ops.rms_norm(torch.randn(3, 4), (4,), weight_offset=float("inf")), "weight_offset must be"),
    (lambda: ops.rms_norm(torch.randn(3, 4), 4.0), "normalized_shape must be an int or a sequence of ints"),
    (lambda: ops.add_rms_norm(torch.randn(3, 4), torch.randn(3, 5), (4,)), r"residual has shape \(3, 5\)"),
    (lambda: ops.add_rms_norm(torch.randn(3, 4).bfloat16(), torch.randn(3, 4), (4,)), "would promote"),
    (lambda: ops.add_rms_norm(torch.randn(3, 4), torch.randn(3, 4), (4,), out_dtype=torch.int32), "out_dtype"),
])
def test_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()
