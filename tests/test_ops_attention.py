import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from nanofast.testing import assert_parity, attention_reference


def _qkv(B, H, Tq, Tk, D, dtype, layout="bthd", Dv=None, seed=0):
    """q, k, v and dout; layout 'bthd' gives nanoGPT's view(B, T, H, D).transpose(1, 2) views."""
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv

    def make(T, d):
        if layout == "bthd":
            return torch.randn(B, T, H, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        return torch.randn(B, H, T, d, generator=g, dtype=torch.float64).to(dtype)

    return make(Tq, D), make(Tk, D), make(Tk, Dv), make(Tq, Dv)


def _run(fn, q, k, v, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def _check(q, k, v, dout, **kw):
    ours = _run(ops.scaled_dot_product_attention, q, k, v, dout, **kw)
    theirs = _run(F.scaled_dot_product_attention, q, k, v, dout, **kw)
    ref = _run(attention_reference, q.double(), k.double(), v.double(), dout.double(), **kw)
    for name, o, t, r in zip(["out", "dq", "dk", "dv"], ours, theirs, ref):
        assert_parity(name, o, t, r)
    return ours


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 7, 63, 65, 97, 257])
def test_parity_seq_lengths(T, causal):
    _check(*_qkv(2, 3, T, T, 64, torch.float32), is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [8, 40, 59, 64, 96, 128, 256])
def test_parity_head_dims(D, causal):
    _check(*_qkv(1, 2, 70, 70, D, torch.float32), is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_parity_dtypes(dtype, causal):
    _check(*_qkv(2, 2, 65, 65, 40, dtype), is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_every_isa(isa, causal):
    _check(*_qkv(2, 2, 97, 97, 59, torch.float32), is_causal=causal)
    _check(*_qkv(1, 2, 33, 33, 24, torch.float64), is_causal=causal)
    # bfloat16: on AVX512-BF16 the score products run on bf16 pairs (an odd head dim pads the last pair)
    _check(*_qkv(2, 2, 97, 97, 59, torch.bfloat16), is_causal=causal)
    _check(*_qkv(1, 3, 70, 129, 64, torch.bfloat16), is_causal=causal)


@pytest.mark.parametrize("Tq,Tk", [(5, 70), (70, 5), (64, 129), (130, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_different_query_and_key_lengths(Tq, Tk, causal):
    _check(*_qkv(2, 2, Tq, Tk, 32, torch.float32), is_causal=causal)


def test_value_head_dim_differs():
    _check(*_qkv(2, 2, 40, 50, 32, torch.float32, Dv=24), is_causal=True)


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_layouts_and_custom_scale(layout):
    _check(*_qkv(2, 4, 50, 50, 16, torch.float32, layout=layout), is_causal=True, scale=0.37)


def test_strided_views_of_a_fused_projection():
    # nanoGPT: qkv = x @ W -> split -> view(B, T, H, D).transpose(1, 2); no copy is made on our side.
    B, T, H, D = 2, 33, 3, 16
    qkv = torch.randn(B, T, 3 * H * D)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    assert not q.is_contiguous()
    _check(q, k, v, torch.randn(B, H, T, D), is_causal=True)


def test_last_dim_not_packed():
    q, k, v, dout = _qkv(1, 2, 20, 20, 16, torch.float32)
    q = torch.randn(1, 2, 20, 32)[..., ::2]
    _check(q, k, v, dout, is_causal=False)


def test_output_layout_makes_the_transpose_free():
    q, k, v, _ = _qkv(2, 3, 10, 10, 8, torch.float32)
    out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("layout", ["bhtd", "bthd", "strided"])
def test_gradients_keep_the_input_layout(layout):
    # A gradient in its input's layout is kept as, or added to, .grad without a strided copy; the
    # fake (torch.compile) implementation must give the same strides as the kernels.
    B, H, T, D = 2, 3, 9, 8
    if layout == "bhtd":
        q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    elif layout == "bthd":
        q, k, v = (torch.randn(B, T, H, D).transpose(1, 2) for _ in range(3))
    else:  # views of one fused projection: not dense, so the gradients take the (B, T, H, D) layout
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in torch.randn(B, T, 3 * H * D).split(H * D, dim=2))
    out, lse = torch.ops.nanofast.sdpa_fwd(q, k, v, True, 0.3, 0.0, None)
    grads = torch.ops.nanofast.sdpa_bwd(torch.randn_like(out), q, k, v, out, lse, True, 0.3, 0.0, None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv, fo, fl = (mode.from_tensor(t) for t in (q, k, v, out, lse))
        fakes = torch.ops.nanofast.sdpa_bwd(torch.empty_like(fo), fq, fk, fv, fo, fl, True, 0.3, 0.0, None)
    for g, t, f in zip(grads, (q, k, v), fakes):
        assert g.stride() == f.stride()
        expected = t.stride() if layout != "strided" else (T * H * D, D, H * D, 1)
        assert g.stride() == expected


def test_gradcheck_float64():
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.7), (q, k, v))


def test_gradcheck_with_dropout():
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        torch.manual_seed(3)  # the same dropout mask at every evaluation
        return ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_deterministic_and_thread_independent():
    q, k, v, dout = _qkv(3, 4, 130, 130, 40, torch.float32)
    threads = torch.get_num_threads()
    try:
        first = _run(ops.scaled_dot_product_attention, q, k, v, dout, is_causal=True)
        again = _run(ops.scaled_dot_product_attention, q, k, v, dout, is_causal=True)
        torch.set_num_threads(1)
        single = _run(ops.scaled_dot_product_attention, q, k, v, dout, is_causal=True)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 0, 5, 8), (2, 2, 0, 8)])
def test_empty(shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape


def test_no_keys_gives_zeros_like_torch():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4)
    assert torch.equal(ops.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_dropout_p_one_gives_zeros_like_torch():
    # dropout_p = 1 drops every score: torch returns zeros and zero gradients, and so do both backends
    # (the Triton one: tests/test_triton_kernels.py::test_dropout_p_one_gives_zeros)
    q, k, v = (torch.randn(2, 3, 9, 8, requires_grad=True) for _ in range(3))
    out = ops.scaled_dot_product_attention(q, k, v, dropout_p=1.0, is_causal=True)
    out.backward(torch.randn_like(out))
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), dropout_p=1.0, is_causal=True)
    assert torch.equal(out, ref) and not out.any()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and not t.grad.any()


def test_nan_propagates_like_torch():
    q, k, v, _ = _qkv(1, 1, 9, 9, 8, torch.float32, layout="bhtd")
    q[0, 0, 2, 1] = float("nan")
    k[0, 0, 5, 0] = float("nan")
    for causal in (False, True):
        ours = ops.scaled_dot_product_attention(q, k, v, is_causal=causal)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        # Wherever torch gives NaN we must too (torch's CPU kernel even zeroes parts of a NaN row).
        assert not (torch.isnan(theirs) & ~torch.isnan(ours)).any()
        assert torch.isnan(ours[0, 0, 2]).all()


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.scaled_dot_product_attention(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4),
                                              attn_mask=torch.ones(3, 4, dtype=torch.bool)),
     ValueError, r"attn_mask of shape \(3, 4\) does not broadcast to .* = \(1, 2, 3, 3\)"),
    (lambda: ops.scaled_dot_product_attention(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4),
                                              attn_mask=torch.zeros(3, 3, requires_grad=True)),
     NotImplementedError, r"attn_mask requires grad"),
    (lambda: ops.scaled_dot_product_attention(_t(1, 2, 3, 4), _t(1, 2, 3, 5), _t(1, 2, 3, 4)),
     ValueError, r"key head_dim 5 must equal query head_dim 4"),
    (lambda: ops.scaled_dot_product_attention(_t(1, 2, 3, 4), _t(1, 3, 3, 4), _t(1, 3, 3, 4)),
     ValueError, r"must agree in batch and heads"),
    (lambda: ops.scaled_dot_product_attention(_t(1, 2, 3, 4), _t(1, 2, 6, 4), _t(1, 2, 5, 4)),
     ValueError, r"value seq_len 5 must equal key seq_len 6"),
    (lambda: ops.scaled_dot_product_attention(_t(2, 3, 4), _t(2, 3, 4), _t(2, 3, 4)),
     ValueError, r"query must be 4-D .* got shape \(2, 3, 4\)"),
    (lambda: ops.scaled_dot_product_attention(_t(1, 1, 2, 300), _t(1, 1, 2, 300), _t(1, 1, 2, 300)),
     ValueError, r"head_dim must be between 0 and 256"),
    (lambda: ops.scaled_dot_product_attention(_t(1, 1, 2, 4), _t(1, 1, 2, 4), _t(1, 1, 2, 4), dropout_p=1.5),
     ValueError, r"dropout_p must be in \[0, 1\], got 1.5"),
    (lambda: ops.scaled_dot_product_attention(_t(1, 1, 2, 4), _t(1, 1, 2, 4, dtype=torch.float64), _t(1, 1, 2, 4)),
     TypeError, r"key has dtype torch.float64 but query has dtype torch.float32"),
    (lambda: ops.scaled_dot_product_attention(torch.ones(1, 1, 2, 4, dtype=torch.int64), _t(1, 1, 2, 4),
                                              _t(1, 1, 2, 4)),
     TypeError, r"query must be a floating-point tensor"),
    (lambda: ops.scaled_dot_product_attention(_t(1, 1, 2, 4), _t(1, 1, 2, 4), _t(1, 1, 2, 4), scale=float("inf")),
     ValueError, r"scale must be a finite number"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_opcheck():
    from torch.library import opcheck

    q, k, v, dout = _qkv(1, 2, 9, 9, 8, torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    opcheck(torch.ops.nanofast.sdpa_fwd.default, (q, k, v, True, 0.3, 0.0, None))
    opcheck(torch.ops.nanofast.sdpa_fwd.default, (q, k, v, False, 0.3, 0.25, torch.tensor([7])))
    out, lse = torch.ops.nanofast.sdpa_fwd(q.detach(), k.detach(), v.detach(), True, 0.3, 0.0, None)
    opcheck(torch.ops.nanofast.sdpa_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, True, 0.3, 0.0,
                                                  None))


def _masked_reference(q, k, v, is_causal=False):
    """Textbook attention whose masked probabilities are exactly 0 even in a row holding a NaN (its
    softmax makes every entry NaN, masked ones too): a masked key gets no gradient from that row."""
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    visible = torch.ones(s.shape[-2:], dtype=torch.bool).tril() if is_causal else torch.ones(s.shape[-2:], dtype=bool)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).masked_fill(~visible, 0.0)
    return p @ v


def check_nan_propagates(sdpa, which, causal, dtype, T, row):
    """A NaN in one element of q, k or v. Without a mask every output depends on it where the float64
    reference says: ours is NaN exactly there and close to it elsewhere. With the causal mask, the
    kernels skip blocks no query sees (so 0 * NaN products that the reference forms do not arise) but
    form some inside the diagonal blocks: NaN may then be more or less widespread than the reference's,
    but never an inf or a wrong finite value in its place."""
    q, k, v, dout = _qkv(1, 2, T, T, 8, torch.float64, layout="bhtd")
    dict(q=q, k=k, v=v)[which][0, 0, row, 3] = float("nan")
    ours = _run(sdpa, *(t.to(dtype) for t in (q, k, v, dout)), is_causal=causal)
    ref = _run(_masked_reference, q, k, v, dout, is_causal=causal)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for name, o, r in zip(["out", "dq", "dk", "dv"], ours, ref):
        assert not o.isinf().any(), f"{name}: {o.isinf().sum()} infs"
        if not causal:
            assert torch.equal(o.isnan(), r.isnan()), f"{name}: NaN at {o.isnan().sum()} places, reference {r.isnan().sum()}"
        assert o.isnan().any() == r.isnan().any(), name
        both = ~(o.isnan() | r.isnan())
        torch.testing.assert_close(o.double()[both], r[both], atol=tol, rtol=tol, msg=name)


# (where the NaN falls in the vectors decides whether a maximum sees it or skips it)
NAN_CASES = [(torch.float32, 8, 3), (torch.float32, 8, 4), (torch.float32, 150, 75), (torch.bfloat16, 70, 3),
             (torch.float64, 8, 3)]


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,T,row", NAN_CASES)
def test_nan_propagates(which, causal, dtype, T, row):
    check_nan_propagates(ops.scaled_dot_product_attention, which, causal, dtype, T, row)


def test_nan_in_k_matches_torch():
    # the case: torch's dv is NaN everywhere (every row's softmax saw the NaN score)
    q, k, v, dout = _qkv(1, 2, 8, 8, 4, torch.float32, layout="bhtd")
    k[0, 0, 3, 1] = float("nan")
    ours = _run(ops.scaled_dot_product_attention, q, k, v, dout)
    theirs = _run(F.scaled_dot_product_attention, q, k, v, dout)
    for name, o, t in zip(["out", "dq", "dk", "dv"], ours, theirs):
        assert torch.equal(o.isnan(), t.isnan()), name
        assert not o.isinf().any(), name


# ---- one query row (sampling's decode step: csrc/attention.h's decode path) ----

# key counts around the spans of 256 keys the path splits a head into
DECODE_KEYS = [1, 7, 255, 256, 257, 600, 1030]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tk", DECODE_KEYS)
def test_one_query_row(Tk, causal):
    """Forward and backward (the backward is the general kernel's, from the decode path's lse)."""
    _check(*_qkv(2, 3, 1, Tk, 64, torch.float32), is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("Tk", [9, 600])
def test_one_query_row_dtypes(dtype, Tk):
    _check(*_qkv(2, 2, 1, Tk, 40, dtype, Dv=24), scale=0.3)


def test_one_query_row_every_isa(isa):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        _check(*_qkv(1, 3, 1, 520, 59, dtype))


def test_one_query_row_against_a_cache_view():
    """The keys and values of a decode step: the first L positions of preallocated (B, H, capacity, D)
    buffers, so the head stride is capacity * D, not L * D."""
    B, H, cap, D, L = 2, 3, 1024, 64, 700
    g = torch.Generator().manual_seed(1)
    k_buf, v_buf = torch.randn(B, H, cap, D, generator=g), torch.randn(B, H, cap, D, generator=g)
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)  # a view of the step's projection
    k, v = k_buf[:, :, :L], v_buf[:, :, :L]
    ours = ops.scaled_dot_product_attention(q, k, v)
    ref = attention_reference(q.double(), k.double(), v.double())
    assert_parity("out", ours, F.scaled_dot_product_attention(q, k, v), ref)
    assert torch.equal(ours, ops.scaled_dot_product_attention(q, k.contiguous(), v.contiguous()))


def test_one_query_row_lse():
    from nanofast.ops import cpu

    q, k, v, _ = _qkv(2, 3, 1, 600, 32, torch.float32)
    out, lse = cpu.attention_forward(q, k, v, False, 0.25, 0.0, None)
    want = torch.logsumexp((q.double() @ k.double().transpose(-2, -1)) * 0.25, dim=-1)
    torch.testing.assert_close(lse.double(), want, rtol=1e-6, atol=1e-5)


def test_one_query_row_thread_independent():
    q, k, v, _ = _qkv(3, 4, 1, 1030, 64, torch.float32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, 1, 3):
            torch.set_num_threads(n)
            runs.append(ops.scaled_dot_product_attention(q, k, v))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("Tk,row", [(8, 3), (600, 300), (600, 10)])
def test_one_query_row_nan_propagates(which, Tk, row):
    q, k, v, _ = _qkv(1, 2, 1, Tk, 8, torch.float64, layout="bhtd")
    dict(q=q, k=k, v=v)[which][0, 0, 0 if which == "q" else row, 3] = float("nan")
    ours = ops.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ref = _masked_reference(q, k, v)
    assert torch.equal(ours.isnan(), ref.isnan()) and not ours.isinf().any()
    both = ~ref.isnan()
    torch.testing.assert_close(ours.double()[both], ref[both], atol=1e-4, rtol=1e-4)


def test_one_query_row_with_dropout_is_the_general_kernels():
    """(The decode path has no dropout: one query row with dropout runs the query-block kernel.)"""
    from nanofast.ops.seed import draw_seed

    q, k, v, _ = _qkv(1, 2, 1, 40, 16, torch.float64)
    torch.manual_seed(3)
    seed = int(draw_seed())
    torch.manual_seed(3)
    ours = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    keep = ops.dropout_mask(seed, 1, 2, 1, 40, 0.5)
    torch.testing.assert_close(ours, attention_reference(q, k, v, keep=keep, p=0.5))
