"""Attention masks, grouped-query attention and the sliding window on the C++ kernels: parity against
the float64 reference (nanofast.testing) with torch's F.scaled_dot_product_attention in the same dtype
as the baseline, torch's answer for queries that see no key, masks read through any strides, and the
usual determinism, gradcheck and torch.compile checks."""
import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from nanofast.ops import cpu
from nanofast.testing import assert_parity, attention_reference

NEG_INF = float("-inf")


def _qkv(B, H, Hkv, Tq, Tk, D, dtype, seed=0, Dv=None):
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) as nanoGPT's (B, T, H, D) views, and dout."""
    g = torch.Generator().manual_seed(seed)

    def make(heads, T, d):
        return torch.randn(B, T, heads, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)

    Dv = D if Dv is None else Dv
    return make(H, Tq, D), make(Hkv, Tk, D), make(Hkv, Tk, Dv), make(H, Tq, Dv)


def _padding(B, Tk, lengths, dtype=torch.bool):
    """A (B, 1, 1, Tk) key padding mask: batch b's first lengths[b] keys take part."""
    keep = torch.arange(Tk)[None, :] < torch.tensor(lengths)[:, None]
    return _as(keep.view(B, 1, 1, Tk), dtype)


def _as(keep, dtype):
    """A bool keep-mask as the mask torch takes in `dtype`: itself, or 0 / -inf."""
    if dtype == torch.bool:
        return keep
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, NEG_INF)


def _random_mask(shape, dtype, seed=1, p_masked=0.3):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) >= p_masked
    if dtype == torch.bool:
        return keep
    return torch.randn(shape, generator=g).to(dtype).masked_fill(~keep, NEG_INF)  # an additive bias too


def _torch_mask(attn_mask, is_causal, window, Tq, Tk):
    """The one mask that gives torch's F.sdpa (which takes no window, and on its math path no mask
    beside is_causal) what nanofast computes from (attn_mask, is_causal, window)."""
    if not is_causal:
        return attn_mask
    ones = torch.ones(Tq, Tk, dtype=torch.bool)
    visible = ones.tril() & (ones.triu(1 - window) if window else ones)
    if attn_mask is None:
        return visible
    if attn_mask.dtype == torch.bool:
        return attn_mask & visible
    return attn_mask.masked_fill(~visible, NEG_INF)


def _run(fn, q, k, v, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def _check(q, k, v, dout, attn_mask=None, is_causal=False, window=None, scale=None):
    """ours, torch's (same dtype) and the float64 reference for out, dq, dk, dv, under the parity rule."""
    gqa = k.shape[1] != q.shape[1]
    ours = _run(ops.scaled_dot_product_attention, q, k, v, dout, attn_mask=attn_mask, is_causal=is_causal,
                window=window, scale=scale, enable_gqa=gqa)
    torch_mask = _torch_mask(attn_mask, is_causal, window, q.shape[2], k.shape[2])
    theirs = _run(F.scaled_dot_product_attention, q, k, v, dout, attn_mask=torch_mask, scale=scale, enable_gqa=gqa)
    ref_mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    ref = _run(attention_reference, q.double(), k.double(), v.double(), dout.double(), attn_mask=ref_mask,
               is_causal=is_causal, window=window, scale=scale)
    for name, o, t, r in zip(["out", "dq", "dk", "dv"], ours, theirs, ref):
        assert_parity(name, o, t, r)
    return ours


# ---- masks ----

@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 7, 63, 65, 97, 257])
def test_key_padding(T, causal, dtype):
    # batch 1 is padded down to a third (whole key blocks masked at T = 257), batch 2 to nothing
    lengths = [T, max(1, T // 3), 0]
    _check(*_qkv(3, 2, 2, T, T, 40, torch.float32), attn_mask=_padding(3, T, lengths, dtype), is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("shape", ["tq_tk", "b_h_tq_tk", "h_tq_tk", "b_1_tq_tk", "1_tk"])
@pytest.mark.parametrize("causal", [False, True])
def test_full_masks(shape, causal, dtype):
    B, H, T = 2, 3, 70
    shapes = dict(tq_tk=(T, T), b_h_tq_tk=(B, H, T, T), h_tq_tk=(H, T, T), b_1_tq_tk=(B, 1, T, T), **{"1_tk": (1, T)})
    _check(*_qkv(B, H, H, T, T, 24, torch.float32), attn_mask=_random_mask(shapes[shape], dtype), is_causal=causal)


@pytest.mark.parametrize("Tq,Tk", [(5, 70), (70, 5), (64, 129), (130, 64), (1, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_masks_with_different_query_and_key_lengths(Tq, Tk, causal):
    _check(*_qkv(2, 2, 2, Tq, Tk, 32, torch.float32), attn_mask=_random_mask((2, 1, Tq, Tk), torch.bool),
           is_causal=causal)
    _check(*_qkv(2, 2, 2, Tq, Tk, 32, torch.float32), attn_mask=_padding(2, Tk, [Tk, Tk // 2]), is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 59, 96])
def test_masks_dtypes_and_head_dims(dtype, D):
    q, k, v, dout = _qkv(2, 2, 2, 65, 65, D, dtype)
    _check(q, k, v, dout, attn_mask=_padding(2, 65, [65, 20]), is_causal=True)
    _check(q, k, v, dout, attn_mask=_random_mask((65, 65), dtype))  # an additive mask in the inputs' dtype
    _check(q, k, v, dout, attn_mask=_random_mask((65, 65), torch.float32))  # float32 beside any dtype, as torch


def test_every_isa(isa):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, k, v, dout = _qkv(2, 4, 2, 97, 97, 40, dtype)
        _check(q, k, v, dout, attn_mask=_padding(2, 97, [97, 30]), is_causal=True, window=33)
        _check(q, k, v, dout, attn_mask=_random_mask((97, 97), torch.float32))


def test_non_contiguous_masks():
    B, H, T = 2, 2, 40
    q, k, v, dout = _qkv(B, H, H, T, T, 16, torch.float32)
    transposed = _random_mask((T, T), torch.bool).t()  # key stride T
    sliced = _random_mask((B, 1, T, 2 * T), torch.float32)[..., ::2]  # key stride 2
    expanded = _padding(B, T, [T, 9]).expand(B, H, T, T)  # stride 0 given by the caller
    for mask in (transposed, sliced, expanded):
        assert not mask.is_contiguous()
        _check(q, k, v, dout, attn_mask=mask, is_causal=True)


def test_a_mask_that_keeps_everything_changes_no_bit():
    # the mask path adds 0 to the same scaled scores: the same bits as no mask
    q, k, v, dout = _qkv(2, 3, 3, 70, 70, 24, torch.float32)
    plain = _run(ops.scaled_dot_product_attention, q, k, v, dout, is_causal=True)
    for mask in (torch.ones(70, 70, dtype=torch.bool), torch.zeros(2, 1, 1, 70)):
        masked = _run(ops.scaled_dot_product_attention, q, k, v, dout, attn_mask=mask, is_causal=True)
        for a, b in zip(plain, masked):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_fully_masked_rows_give_what_torch_gives(dtype):
    # torch's math and flash paths both give zeros, with zero gradients, for a query whose every key
    # is masked out (a false bool, or -inf added); so does a row the causal mask leaves empty of
    # the keys the mask keeps
    B, H, T = 2, 2, 70
    q, k, v, dout = _qkv(B, H, H, T, T, 16, torch.float32)
    keep = torch.ones(B, H, T, T, dtype=torch.bool)
    keep[0, 1, 5] = False  # one row
    keep[1, :, :, :3] = False  # the causal mask leaves rows 0..2 of batch 1 nothing
    mask = _as(keep, dtype)
    for causal in (False, True):
        ours = _check(q, k, v, dout, attn_mask=mask, is_causal=causal)
        theirs = _run(F.scaled_dot_product_attention, q, k, v, dout,
                      attn_mask=_torch_mask(mask, causal, None, T, T))
        empty = [(0, 1, slice(5, 6))] + ([(1, slice(None), slice(0, 3))] if causal else [])
        for b, h, rows in empty:  # out and dq: exactly 0 on those rows, as torch's
            for o, t in zip(ours[:2], theirs[:2]):
                assert not o[b, h, rows].any() and not t[b, h, rows].any()
        for name, o in zip(["out", "dq", "dk", "dv"], ours):
            assert torch.isfinite(o).all(), name


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_masked_out_keys_nan_score_stays_out(dtype):
    # a masked-out key's score is replaced, as masked_fill replaces it, not added to (torch adds -inf,
    # so that a NaN key reaches every row). (A NaN key or value still meets a zero in the products
    # dQ = dS K and O = P V, and 0 * NaN is NaN, in torch's products and these kernels' alike.)
    q, k, v, dout = _qkv(1, 2, 2, 20, 20, 8, torch.float32)
    k = k.clone()
    k[0, :, 15] = float("nan")
    out = _run(ops.scaled_dot_product_attention, q, k, v, dout, attn_mask=_padding(1, 20, [15], dtype))
    for name, t in zip(["out", "dk", "dv"], out[0:1] + out[2:]):
        assert torch.isfinite(t).all(), name


# ---- grouped-query attention ----

@pytest.mark.parametrize("Hkv", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 7, 65, 97])
def test_grouped_query_attention(Hkv, causal, T):
    _check(*_qkv(2, 8, Hkv, T, T, 24, torch.float32), is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_grouped_query_attention_dtypes(dtype):
    q, k, v, dout = _qkv(2, 6, 2, 70, 70, 40, dtype)
    _check(q, k, v, dout, is_causal=True)
    _check(q, k, v, dout, attn_mask=_padding(2, 70, [70, 33]))


def test_grouped_query_attention_value_head_dim_differs():
    _check(*_qkv(2, 4, 2, 40, 50, 32, torch.float32, Dv=24), is_causal=True)


def test_grouped_query_attention_copies_no_heads():
    # the gradients come out with k's and v's own shapes and layouts
    q, k, v, dout = _qkv(2, 8, 2, 9, 9, 16, torch.float32)
    _, _, dk, dv = _run(ops.scaled_dot_product_attention, q, k, v, dout, enable_gqa=True)
    assert dk.shape == k.shape and dk.stride() == k.stride() and dv.stride() == v.stride()


# ---- the sliding window ----

@pytest.mark.parametrize("window", [1, 3, 32, 64, 100, 300])
@pytest.mark.parametrize("T", [7, 65, 257])
def test_sliding_window(window, T):
    _check(*_qkv(2, 2, 2, T, T, 32, torch.float32), is_causal=True, window=window)


@pytest.mark.parametrize("Tq,Tk", [(5, 70), (130, 64), (200, 20)])
def test_sliding_window_different_lengths(Tq, Tk):
    # with Tq > Tk + window the last queries see no key: zeros
    _check(*_qkv(2, 4, 2, Tq, Tk, 32, torch.float32), is_causal=True, window=9)


def test_sliding_window_equals_its_mask():
    # Hugging Face passes Mistral's window as a bool mask: the same result either way, bit for bit
    T, window = 257, 50
    q, k, v, dout = _qkv(1, 2, 2, T, T, 32, torch.float32)
    as_window = _run(ops.scaled_dot_product_attention, q, k, v, dout, is_causal=True, window=window)
    as_mask = _run(ops.scaled_dot_product_attention, q, k, v, dout,
                   attn_mask=_torch_mask(None, True, window, T, T), is_causal=False)
    for a, b in zip(as_window, as_mask):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


# ---- dropout, determinism, gradcheck, compile ----

def test_dropout_with_masks_and_groups_uses_the_same_keep_mask():
    B, H, Hkv, T, p, seed = 2, 4, 2, 70, 0.3, 1234
    q, k, v, dout = _qkv(B, H, Hkv, T, T, 16, torch.float32)
    mask = _padding(B, T, [T, 40])
    keep = cpu.dropout_mask(seed, B, H, T, T, p)  # the mask attention without masks applies too
    out, lse = cpu.attention_forward(q, k, v, True, 0.25, p, seed, mask, 20)
    grads = cpu.attention_backward(dout, q, k, v, out, lse, True, 0.25, p, seed, mask, 20)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, True, 0.25, keep, p, mask, 20)
    ref.backward(dout.double())
    for name, o, r in zip(["out", "dq", "dk", "dv"], (out, *grads), (ref, q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(o.double(), r.detach(), atol=1e-5, rtol=1e-5, msg=name)


def test_deterministic_and_thread_independent():
    q, k, v, dout = _qkv(3, 8, 2, 130, 130, 40, torch.float32)
    kw = dict(attn_mask=_random_mask((3, 1, 130, 130), torch.bool), is_causal=True, window=70, enable_gqa=True)
    threads = torch.get_num_threads()
    try:
        first = _run(ops.scaled_dot_product_attention, q, k, v, dout, **kw)
        again = _run(ops.scaled_dot_product_attention, q, k, v, dout, **kw)
        torch.set_num_threads(1)
        single = _run(ops.scaled_dot_product_attention, q, k, v, dout, **kw)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


GRADCHECK_CASES = {
    "bool_mask_causal": dict(attn_mask=torch.tensor([[True] * 4 + [False]] * 5), is_causal=True),
    "additive_mask": dict(attn_mask=torch.randn(1, 1, 5, 5, dtype=torch.float64)),
    "fully_masked_row": dict(attn_mask=torch.tensor([[True] * 5] * 2 + [[False] * 5] + [[True] * 5] * 2)),
    "window": dict(is_causal=True, window=2),
    "gqa_padding": dict(attn_mask=torch.tensor([True, True, True, False, False]).view(1, 1, 1, 5), heads=1),
}


@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck_float64(name):
    kw = dict(GRADCHECK_CASES[name])
    Hkv = kw.pop("heads", 2)
    q = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, Hkv, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, scale=0.7, enable_gqa=Hkv != 2, **kw), (q, k, v))


def test_gradcheck_with_dropout_and_mask():
    q = torch.randn(1, 4, 6, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = _padding(1, 6, [4])

    def f(q, k, v):
        torch.manual_seed(3)  # the same dropout mask at every evaluation
        return ops.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.3, is_causal=True, enable_gqa=True)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_compile_fullgraph():
    q, k, v, dout = _qkv(2, 4, 2, 33, 33, 16, torch.float32)
    mask = _padding(2, 33, [33, 20])

    def f(q, k, v, mask):
        return ops.scaled_dot_product_attention(q, k, v, mask, is_causal=True, enable_gqa=True, window=10) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = _run(lambda q, k, v: f(q, k, v, mask), q, k, v, dout)
    got = _run(lambda q, k, v: compiled(q, k, v, mask), q, k, v, dout)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)


def test_compile_inductor_with_a_mask_built_in_the_graph():
    # as a Hugging Face model builds its padding mask inside the forward
    torch._dynamo.reset()
    q, k, v, _ = _qkv(2, 4, 2, 17, 17, 8, torch.float32)
    lengths = torch.tensor([17, 9])

    def f(q, k, v, lengths):
        mask = (torch.arange(k.shape[2]) < lengths[:, None]).view(-1, 1, 1, k.shape[2])
        return ops.scaled_dot_product_attention(q, k, v, mask, is_causal=True, enable_gqa=True)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v, lengths), f(q, k, v, lengths))


def test_opcheck():
    from torch.library import opcheck

    q, k, v, dout = _qkv(1, 4, 2, 9, 9, 8, torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    mask = _random_mask((9, 9), torch.float32).t()  # transposed: read through its strides
    for m in (mask, _padding(1, 9, [6])):
        opcheck(torch.ops.nanofast.sdpa_fwd.default, (q, k, v, True, 0.3, 0.0, None, m, 4))
        out, lse = torch.ops.nanofast.sdpa_fwd(q.detach(), k.detach(), v.detach(), True, 0.3, 0.0, None, m, 4)
        opcheck(torch.ops.nanofast.sdpa_bwd.default,
                (dout, q.detach(), k.detach(), v.detach(), out, lse, True, 0.3, 0.0, None, m, 4))


# ---- what is refused ----

def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _sdpa(q=(1, 4, 3, 8), k=(1, 4, 3, 8), **kw):
    return ops.scaled_dot_product_attention(_t(*q), _t(*k), _t(*k), **kw)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: _sdpa(attn_mask=torch.ones(3, 3, dtype=torch.int32)), TypeError,
     r"attn_mask must be bool, float32 or query's dtype \(torch.float32\), got torch.int32"),
    (lambda: _sdpa(attn_mask=torch.zeros(3, 3, dtype=torch.bfloat16)), TypeError,
     r"attn_mask must be bool, float32 or query's dtype"),
    (lambda: _sdpa(attn_mask=torch.ones(3, dtype=torch.bool)), ValueError,
     r"attn_mask of shape \(3,\) does not broadcast to \(batch, heads, query len, key len\) = \(1, 4, 3, 3\)"),
    (lambda: _sdpa(attn_mask=torch.ones(1, 1, 1, 3, 3, dtype=torch.bool)), ValueError, r"does not broadcast"),
    (lambda: _sdpa(attn_mask=torch.ones(2, 1, 3, 3, dtype=torch.bool)), ValueError, r"does not broadcast"),
    (lambda: _sdpa(attn_mask=[[True]]), TypeError, r"attn_mask must be a torch.Tensor or None, got list"),
    (lambda: _sdpa(k=(1, 2, 3, 8)), ValueError, r"must agree in batch and heads \(or pass enable_gqa=True"),
    (lambda: _sdpa(k=(1, 3, 3, 8), enable_gqa=True), ValueError,
     r"key/value heads that divide the query heads, got query \(1, 4, 3, 8\), key \(1, 3, 3, 8\)"),
    (lambda: ops.scaled_dot_product_attention(_t(1, 4, 3, 8), _t(1, 2, 3, 8), _t(1, 1, 3, 8), enable_gqa=True),
     ValueError, r"must agree in batch and heads \(key and value in heads\)"),
    (lambda: _sdpa(window=4), ValueError, r"window=4 is a sliding window over the causal mask .* is_causal=True"),
    (lambda: _sdpa(window=-1, is_causal=True), ValueError, r"window must be a positive int or None, got -1"),
    (lambda: _sdpa(window=2.5, is_causal=True), ValueError, r"got 2.5"),
    (lambda: _sdpa(attn_mask=torch.zeros(3, 3, requires_grad=True)), NotImplementedError,
     r"attn_mask requires grad, but nanofast gives the mask no gradient"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_a_mask_that_requires_grad_is_fine_without_grad_mode():
    mask = torch.zeros(3, 3, requires_grad=True)
    with torch.no_grad():
        _sdpa(attn_mask=mask)
