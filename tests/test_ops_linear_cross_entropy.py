"""nanofast.ops.linear_cross_entropy: F.cross_entropy(F.linear(...)) computed a chunk of rows at a time,
never storing the logits whole."""
import pytest
import torch
import torch.nn.functional as F

from nanofast import _C, ops
from nanofast.ops import chunked_cross_entropy, cpu, cuda
from nanofast.testing import assert_parity

IGNORE = -100


def _reference(x, w, t, b=None, **kw):
    return F.cross_entropy(F.linear(x, w, b), t, **kw)


def _run(fn, x, w, b, t, dloss, autocast=False, **kw):
    """(loss, dx, dw[, db]) of fn with fresh leaves."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    leaves = (x, w) if b is None else (x, w, b.detach().clone().requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x, w, t, None if b is None else leaves[2], **kw)
    return (loss.detach(),) + torch.autograd.grad(loss, leaves, dloss)


def _case(N, C, V, seed, ignored=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    w = torch.randn(V, C, generator=g, dtype=torch.float64) / C ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignored:
        t[1::4] = IGNORE
    return g, x, w, b, t


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that small shapes run the loop several times (and a last part chunk)."""
    monkeypatch.setattr(chunked_cross_entropy, "CHUNK_MIN_ROWS", 1)
    monkeypatch.setattr(chunked_cross_entropy, "CHUNK_BYTES", 24 * 1000 * 4)


def _bits(t):
    return t.contiguous().view(-1).view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


# (N, C, V): single rows and odd sizes, V of 1 and not a multiple of the chunk or the vector width; the
# last two large enough for the GEMMs
SHAPES = [(1, 8, 5), (7, 5, 1), (65, 33, 17), (257, 64, 1000), (96, 130, 2049)]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N,C,V", SHAPES)
def test_parity_with_float64(N, C, V, dtype, reduction, label_smoothing, small_chunks):
    g, x, w, b, t = _case(N, C, V, N * 1000 + V)
    dloss = torch.randn((N,) if reduction == "none" else (), generator=g, dtype=torch.float64)
    kw = dict(label_smoothing=label_smoothing, reduction=reduction)
    c = lambda v: v.to(dtype)  # noqa: E731
    ours = _run(ops.linear_cross_entropy, c(x), c(w), c(b), t, c(dloss), **kw)
    theirs = _run(_reference, c(x), c(w), c(b), t, c(dloss), **kw)
    ref = _run(_reference, x, w, b, t, dloss, **kw)
    for name, o, th, r in zip(["loss", "dx", "dweight", "dbias"], ours, theirs, ref):
        assert_parity(name, o, th, r)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("N,C,V", [(65, 33, 17), (257, 64, 1000)])
def test_every_instruction_set(N, C, V, reduction, isa, small_chunks):
    g, x, w, b, t = _case(N, C, V, 11)
    dloss = torch.randn((N,) if reduction == "none" else (), generator=g, dtype=torch.float64)
    kw = dict(label_smoothing=0.05, reduction=reduction)
    ours = _run(ops.linear_cross_entropy, x.float(), w.float(), b.float(), t, dloss.float(), **kw)
    theirs = _run(_reference, x.float(), w.float(), b.float(), t, dloss.float(), **kw)
    ref = _run(_reference, x, w, b, t, dloss, **kw)
    for name, o, th, r in zip(["loss", "dx", "dweight", "dbias"], ours, theirs, ref):
        assert_parity(name, o, th, r)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("N,C,V", [(65, 33, 17), (257, 64, 1000)])
def test_bfloat16_autocast(N, C, V, reduction, small_chunks):
    """Under CPU autocast: bfloat16 products, a float32 loss, the gradients in the leaves' dtypes."""
    g, x, w, b, t = _case(N, C, V, 12)
    dloss = torch.randn((N,) if reduction == "none" else (), generator=g)
    kw = dict(label_smoothing=0.1, reduction=reduction)
    ours = _run(ops.linear_cross_entropy, x.float(), w.float(), b.float(), t, dloss, autocast=True, **kw)
    theirs = _run(_reference, x.float(), w.float(), b.float(), t, dloss, autocast=True, **kw)
    ref = _run(_reference, x, w, b, t, dloss.double(), **kw)
    for name, o, th, r in zip(["loss", "dx", "dweight", "dbias"], ours, theirs, ref):
        assert o.dtype == th.dtype == torch.float32, name
        assert_parity(name, o, th, r)
    # bfloat16 rows (what add_layer_norm hands the head under autocast) against float32 weights
    ours = _run(ops.linear_cross_entropy, x.bfloat16(), w.float(), None, t, dloss, autocast=True, **kw)
    theirs = _run(_reference, x.bfloat16(), w.float(), None, t, dloss, autocast=True, **kw)
    assert [o.dtype for o in ours] == [th.dtype for th in theirs] == [torch.float32, torch.bfloat16, torch.float32]
    ref = _run(_reference, x.bfloat16().double(), w, None, t, dloss.double(), **kw)
    for name, o, th, r in zip(["loss", "dx", "dweight"], ours, theirs, ref):
        assert_parity(name, o, th, r)


def test_gradcheck_float64():
    g, x, w, b, t = _case(6, 4, 7, 13)
    for reduction in ("mean", "sum", "none"):
        def fn(x, w, b):
            return ops.linear_cross_entropy(x, w, t, b, label_smoothing=0.2, reduction=reduction)
        leaves = [v.clone().requires_grad_() for v in (x, w, b)]
        assert torch.autograd.gradcheck(fn, leaves)
        assert torch.autograd.gradgradcheck(fn, leaves)  # create_graph=True: the differentiable recomputation
    assert torch.autograd.gradcheck(lambda x, w: ops.linear_cross_entropy(x, w, t), (x.requires_grad_(), w))


def test_backward_twice_and_scaled_losses(small_chunks):
    """The saved gradients are handed on as they are for an incoming gradient of 1 and never changed
    in place: a second backward (retain_graph=True) and a scaled loss get what they should."""
    g, x, w, b, t = _case(65, 33, 17, 20)
    x, w, b = (v.float().requires_grad_() for v in (x, w, b))
    loss = ops.linear_cross_entropy(x, w, t, b)
    first = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    again = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    tripled = torch.autograd.grad(loss * 3, (x, w, b))
    for a, c, d in zip(first, again, tripled):
        assert torch.equal(a, c)
        torch.testing.assert_close(d, 3 * a)
    x.grad = None
    ops.linear_cross_entropy(x, w, t, b).backward()
    x.grad.mul_(0)  # the caller's in-place changes reach no saved tensor
    loss = ops.linear_cross_entropy(x, w, t, b)
    assert torch.equal(torch.autograd.grad(loss, x)[0], first[0])


def test_no_gradients_computed_without_grad_mode(monkeypatch):
    """Under no_grad (evaluation) the forward computes the loss alone, whatever the inputs require."""
    calls = []
    real = cpu.linear_cross_entropy_forward

    def spy(*args):
        calls.append(args[-3:])
        return real(*args)

    monkeypatch.setattr(cpu, "linear_cross_entropy_forward", spy)
    x, w, t = torch.randn(6, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True), torch.zeros(6).long()
    with torch.no_grad():
        ops.linear_cross_entropy(x, w, t)
    ops.linear_cross_entropy(x, w, t)
    assert calls == [(False, False, False), (True, True, False)]


def test_leading_dimensions_and_views(small_chunks):
    """(B, T, C) input with (B, T) targets; transposed input and weight views give the same bits."""
    g = torch.Generator().manual_seed(14)
    x, w = torch.randn(4, 48, 96, generator=g), torch.randn(160, 96, generator=g)
    t = torch.randint(0, 160, (4, 48), generator=g)
    dense = ops.linear_cross_entropy(x, w, t, reduction="none")
    assert dense.shape == (4, 48)
    torch.testing.assert_close(dense, _reference(x.view(-1, 96), w, t.view(-1), reduction="none").view(4, 48))
    for xv, wv in ((x.transpose(-1, -2).contiguous().transpose(-1, -2), w), (x, w.t().contiguous().t()),
                   (torch.cat([x, x], -1)[..., :96], w)):
        assert torch.equal(_bits(ops.linear_cross_entropy(xv, wv, t, reduction="none")), _bits(dense))
    # an unbatched input (C,) with a 0-d target, as torch's cross-entropy takes
    torch.testing.assert_close(ops.linear_cross_entropy(x[0, 0], w, t[0, 0]), _reference(x[0, 0], w, t[0, 0]))


@pytest.mark.parametrize("autocast", [False, True])
def test_deterministic_and_independent_of_the_thread_count(autocast, small_chunks):
    g, x, w, b, t = _case(257, 64, 1000, 15)
    x, w, b = x.float(), w.float(), b.float()
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            runs.append(_run(ops.linear_cross_entropy, x, w, b, t, torch.tensor(1.5), autocast=autocast,
                             label_smoothing=0.1))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(_bits(a), _bits(c))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(reduction):
    """What torch gives: a NaN mean, zero sums, and zero gradients."""
    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(9, 8, requires_grad=True)
    t = torch.full((5,), 3)
    for ignore_index in (IGNORE, 3):
        tt = t if ignore_index == 3 else torch.full((5,), IGNORE)
        ours = ops.linear_cross_entropy(x, w, tt, ignore_index=ignore_index, label_smoothing=0.1, reduction=reduction)
        theirs = _reference(x, w, tt, ignore_index=ignore_index, label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        grads = torch.autograd.grad(ours.sum(), (x, w))
        assert not any(gr.any() for gr in grads)


def test_no_rows():
    x, w = torch.randn(0, 8, requires_grad=True), torch.randn(9, 8, requires_grad=True)
    t = torch.zeros(0, dtype=torch.int64)
    for reduction in ("mean", "sum", "none"):
        ours = ops.linear_cross_entropy(x, w, t, reduction=reduction)
        torch.testing.assert_close(ours, _reference(x, w, t, reduction=reduction), equal_nan=True)
    loss = ops.linear_cross_entropy(x, w, t, reduction="sum")
    loss.backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and not w.grad.any()


def test_nan_and_infinite_logits_reach_only_their_rows():
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    x[1, 2], x[3] = float("nan"), 0.0
    b = torch.zeros(5)
    b[0] = float("inf")
    t = torch.tensor([1, 2, 3, 4, 0, 1])
    for eps in (0.0, 0.1):
        ours = ops.linear_cross_entropy(x, w, t, b, label_smoothing=eps, reduction="none")
        torch.testing.assert_close(ours, _reference(x, w, t, b, label_smoothing=eps, reduction="none"),
                                   equal_nan=True)


def test_torch_ops_row_pass_matches_the_cpu_kernels(small_chunks):
    """The CUDA backend's launchers (torch's matmuls and the row pass in torch ops) run on CPU tensors too."""
    g, x, w, b, t = _case(50, 20, 33, 16)
    for dtype, products in ((torch.float64, None), (torch.float32, None), (torch.float32, torch.bfloat16)):
        xs, ws, bs = x.to(dtype), w.to(dtype), b.to(dtype)
        tol = dict(rtol=2e-2, atol=2e-2) if products else {}
        for reduction in ("mean", "sum", "none"):
            args = (xs, ws, bs, t, IGNORE, 0.3, reduction, products, True, True, True)
            for ours, theirs in zip(cpu.linear_cross_entropy_forward(*args), cuda.linear_cross_entropy_forward(*args)):
                assert (ours is None) == (theirs is None)
                if ours is not None:
                    torch.testing.assert_close(ours, theirs, **tol)
        dloss = torch.randn(50, generator=g, dtype=dtype)
        args = (dloss, xs, ws, bs, t, IGNORE, 0.3, products, True, True, True)
        for ours, theirs in zip(cpu.linear_cross_entropy_backward(*args), cuda.linear_cross_entropy_backward(*args)):
            torch.testing.assert_close(ours, theirs, **tol)
    bad = t.clone()
    bad[7] = 33
    with pytest.raises(RuntimeError, match="target is out of range"):
        cuda.linear_cross_entropy_forward(x, w, b, bad, IGNORE, 0.0, "mean", None, False, False, False)


def test_chunk_rows():
    rows = chunked_cross_entropy.chunk_rows
    assert rows(768, 65, 4) == 768  # nanoGPT's character model: one chunk
    assert rows(12 * 1024, 50304, 4) == chunked_cross_entropy.CHUNK_MIN_ROWS  # GPT-2's vocabulary
    assert rows(1, 50304, 4) == 1 and rows(0, 5, 4) == 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target=torch.randn(6)), TypeError, r"target must hold class indices as torch.int64 .* dtype torch.float32"),
    (dict(target=torch.zeros(6, dtype=torch.int32)), TypeError, r"torch.int64"),
    (dict(target=torch.zeros(6, 1, dtype=torch.int64)), ValueError,
     r"target must have input's shape without its last dimension, \(6,\): input has shape \(6, 8\), target \(6, 1\)"),
    (dict(target=[0] * 6), TypeError, r"target must be a torch.Tensor"),
    (dict(weight=torch.randn(5, 7)), ValueError, r"input's last dimension must equal weight's in_features"),
    (dict(weight=torch.randn(8)), ValueError, r"weight must be 2-D"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
    (dict(weight=torch.randn(5, 8).double()), TypeError, r"weight has dtype torch.float64 but input has dtype"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(ignore_index=1.0), TypeError, r"ignore_index must be an int"),
])
def test_bad_inputs(kwargs, error, match):
    args = dict(input=torch.randn(6, 8), weight=torch.randn(5, 8), target=torch.zeros(6, dtype=torch.int64))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.linear_cross_entropy(**args)


@pytest.mark.parametrize("value", [5, -1, -101])
def test_targets_out_of_range(value, small_chunks):
    """torch's IndexError, naming the value, where it is and the number of classes; -100 is ignored."""
    x, w = torch.randn(80, 8), torch.randn(5, 8)
    t = torch.zeros(80, dtype=torch.int64)
    t[61] = value
    t[3] = IGNORE
    with pytest.raises(IndexError, match=rf"target {value} at position 61 .* out of range for 5 classes"):
        ops.linear_cross_entropy(x, w, t)
    t[61] = 4
    ops.linear_cross_entropy(x, w, t)


def test_float16_and_other_autocast_regions_are_torchs():
    x, w, t = torch.randn(6, 8), torch.randn(5, 8), torch.zeros(6, dtype=torch.int64)
    assert torch.equal(ops.linear_cross_entropy(x.half(), w.half(), t), _reference(x.half(), w.half(), t))
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(ops.linear_cross_entropy(x, w, t), _reference(x, w, t))


def test_opcheck():
    from torch.library import opcheck

    g, x, w, b, t = _case(37, 16, 29, 17)
    x, w, b = x.float().requires_grad_(), w.float().requires_grad_(), b.float().requires_grad_()
    fwd, bwd = torch.ops.nanofast.linear_cross_entropy_fwd.default, torch.ops.nanofast.linear_cross_entropy_bwd.default
    for reduction in ("mean", "sum", "none"):
        opcheck(fwd, (x, w, b, t, IGNORE, 0.1, reduction, None, True, True, True))
    # a transposed input, and only the weight's gradient
    opcheck(fwd, (x.detach().t().contiguous().t(), w, None, t, IGNORE, 0.0, "mean", None, False, True, False))
    opcheck(bwd, (torch.randn(37), x.detach(), w.detach(), b.detach(), t, IGNORE, 0.1, None, True, True, True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    g, x, w, b, t = _case(37, 16, 29, 18)
    x, w, b = (v.float().requires_grad_() for v in (x, w, b))

    def fn(x, w, b, t):
        return ops.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, reduction=reduction)

    loss = torch.compile(fn, fullgraph=True)(x, w, b, t)
    ref = _reference(x, w, t, b, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(loss, ref)
    for ours, theirs in zip(torch.autograd.grad(loss.sum(), (x, w, b)), torch.autograd.grad(ref.sum(), (x, w, b))):
        torch.testing.assert_close(ours, theirs)


def test_avx2_build_matches():
    """Below AVX-512 the products are torch's matmul and the row pass the AVX2 build's."""
    if "avx2" not in _C.available_isas().split(","):
        pytest.skip("this CPU has no AVX2")
    g, x, w, b, t = _case(100, 64, 300, 19)
    x, w = x.float(), w.float()
    ours = ops.linear_cross_entropy(x, w, t)
    try:
        _C.select_isa("avx2")
        fallback = ops.linear_cross_entropy(x, w, t)
    finally:
        _C.select_isa("auto")
    torch.testing.assert_close(ours, fallback)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,C,V", [(7, 5, 1), (257, 64, 1000), (96, 130, 2049)])
def test_cuda_parity_with_float64(N, C, V, dtype, reduction, small_chunks):
    """The CUDA backend on CUDA tensors, chunked, against torch on CUDA in the same dtype."""
    g, x, w, b, t = _case(N, C, V, N + V)
    dloss = torch.randn((N,) if reduction == "none" else (), generator=g, dtype=torch.float64)
    kw = dict(label_smoothing=0.1, reduction=reduction)
    c = lambda v: v.to("cuda", dtype)  # noqa: E731
    ours = _run(ops.linear_cross_entropy, c(x), c(w), c(b), t.cuda(), c(dloss), **kw)
    theirs = _run(_reference, c(x), c(w), c(b), t.cuda(), c(dloss), **kw)
    ref = _run(_reference, x, w, b, t, dloss, **kw)
    for name, o, th, r in zip(["loss", "dx", "dweight", "dbias"], ours, theirs, ref):
        assert o.device.type == "cuda"
        assert_parity(name, o.cpu(), th.cpu(), r)
