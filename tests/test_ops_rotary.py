"""nanofast.ops.apply_rotary_pos_emb against Hugging Face's apply_rotary_pos_emb (rotate_half) and GPT-J's
rotate_every_two, in the same dtype and in float64, for both outputs and both gradients."""
import pytest
import torch

from nanofast import ops
from nanofast.testing import assert_parity

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def rotate_half(x):  # transformers' modeling_llama.rotate_half
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):  # transformers' modeling_gptj.rotate_every_two
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)


def hf_apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, interleaved=False):
    """transformers' modeling_llama.apply_rotary_pos_emb (interleaved: GPT-J's rotation), with the columns
    past cos's width passed through as GPT-NeoX's partial rotary does."""
    rotate = rotate_every_two if interleaved else rotate_half
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    R = cos.shape[-1]

    def one(x):
        x_rot, x_pass = x[..., :R], x[..., R:]
        out = (x_rot * cos) + (rotate(x_rot) * sin)
        return torch.cat((out, x_pass.to(out.dtype)), dim=-1) if R < x.shape[-1] else out

    return one(q), one(k)


def cos_sin(B, T, R, dtype, interleaved=False, base=10000.0, batch_positions=True, seed=0):
    """LlamaRotaryEmbedding's cos and sin for position ids (B, T) (offset per batch row, as with left
    padding), R wide: each frequency on both halves, or repeated pairwise when interleaved."""
    inv_freq = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.int64).to(F64) / R))
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 50, (B if batch_positions else 1, 1), generator=g)
    pos = (start + torch.arange(T)).to(F64)
    freqs = pos[:, :, None] * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(B, H, Hk, T, D, dtype, layout="bhtd", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # the projections' output viewed as heads and transposed, as the models do
        q, k = (torch.randn(B, T, h, D, generator=g, dtype=F64).to(dtype).transpose(1, 2) for h in (H, Hk))
    else:
        q, k = (torch.randn(B, h, T, D, generator=g, dtype=F64).to(dtype) for h in (H, Hk))
    dq, dk = (torch.randn(t.shape, generator=g, dtype=F64) for t in (q, k))
    return q, k, dq, dk


def _run(fn, q, k, cos, sin, dq, dk, **kw):
    q, k = (t.detach().clone().requires_grad_() for t in (q, k))
    qe, ke = fn(q, k, cos, sin, **kw)
    torch.autograd.backward([qe, ke], [dq.to(qe.dtype), dk.to(ke.dtype)])
    return qe.detach(), ke.detach(), q.grad, k.grad


def _check(q, k, cos, sin, dq, dk, **kw):
    ours = _run(ops.apply_rotary_pos_emb, q, k, cos, sin, dq, dk, **kw)
    theirs = _run(hf_apply_rotary_pos_emb, q, k, cos, sin, dq, dk, **kw)
    ref = _run(hf_apply_rotary_pos_emb, *(t.double() for t in (q, k, cos, sin, dq, dk)), **kw)
    for name, o, t, r in zip(["q_embed", "k_embed", "dq", "dk"], ours, theirs, ref):
        assert o.dtype == t.dtype and o.shape == t.shape, f"{name}: {o.dtype} {tuple(o.shape)} vs torch's"
        assert_parity(name, o, t, r)
    return ours


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("D", [2, 8, 64, 80, 128])
def test_parity_head_dims(D, dtype, interleaved, isa):
    B, H, Hk, T = 2, 4, 2, 7  # grouped-query: k has fewer heads
    q, k, dq, dk = _qk(B, H, Hk, T, D, dtype, "bthd")
    cos, sin = cos_sin(B, T, D, dtype, interleaved)
    _check(q, k, cos, sin, dq, dk, interleaved=interleaved)


@pytest.mark.parametrize("T", [1, 7, 63, 65, 97, 257])
def test_parity_sequence_lengths(T):
    q, k, dq, dk = _qk(2, 3, 3, T, 64, BF16)
    _check(q, k, *cos_sin(2, T, 64, BF16), dq, dk)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_bfloat16_q_beside_float32_cos(interleaved):
    # under autocast the projections are bf16 and the rotary embedding float32: the results are float32,
    # the gradients of q and k bfloat16
    q, k, dq, dk = _qk(2, 4, 1, 9, 32, BF16, "bthd")
    cos, sin = cos_sin(2, 9, 32, F32, interleaved)
    qe, ke, gq, gk = _check(q, k, cos, sin, dq, dk, interleaved=interleaved)
    assert qe.dtype == ke.dtype == F32 and gq.dtype == gk.dtype == BF16


def test_seq_heads_layout_and_unsqueeze_dim_2():
    # (batch, seq, heads, head_dim) q and k, cos unsqueezed at 2 (flash-attention's layout)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 11, 4, 16, generator=g), torch.randn(2, 11, 2, 16, generator=g)
    _check(q, k, *cos_sin(2, 11, 16, F32), torch.randn(q.shape), torch.randn(k.shape), unsqueeze_dim=2)


def test_cos_shared_by_the_batch_and_partial_rotary():
    q, k, dq, dk = _qk(3, 2, 2, 5, 40, F32)
    cos, sin = cos_sin(3, 5, 40, F32, batch_positions=False)  # (1, T, D): broadcast over the batch
    _check(q, k, cos, sin, dq, dk)
    cos, sin = cos_sin(3, 5, 16, F32)  # the first 16 of 40 columns rotated, the rest copied
    for interleaved in (False, True):
        _check(q, k, cos, sin, dq, dk, interleaved=interleaved)


def test_non_contiguous_views_and_layout():
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 6, 3, 4, 16, generator=g)  # a fused qkv projection's output
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # strided views, read in place
    cos, sin = cos_sin(2, 6, 16, F32)
    qe, ke, _, _ = _check(q, k, cos, sin, torch.randn(q.shape), torch.randn(k.shape))
    q2 = torch.randn(2, 6, 4, 16, generator=g).transpose(1, 2)  # dense (B, T, H, D) memory: kept
    qe2, _ = ops.apply_rotary_pos_emb(q2, q2, cos, sin)
    assert qe2.stride() == q2.stride()
    q3 = torch.randn(2, 4, 6, 32, generator=g)[..., ::2]  # a strided last dim: packed
    _check(q3, q3, cos, sin, torch.randn(q3.shape), torch.randn(q3.shape))
    cos_t = cos.transpose(0, 1).contiguous().transpose(0, 1)  # cos and sin of other layouts
    _check(q, k, cos_t, sin, torch.randn(q.shape), torch.randn(k.shape))


def test_one_output_used_and_expanded_gradients():
    q, k, _, _ = _qk(1, 2, 2, 5, 8, F32)
    cos, sin = cos_sin(1, 5, 8, F32)
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    qe, ke = ops.apply_rotary_pos_emb(qr, kr, cos, sin)
    (2 * qe.sum()).backward()  # an expanded gradient (stride 0) for q_embed, none for k_embed
    q64 = q.double().requires_grad_()
    (2 * hf_apply_rotary_pos_emb(q64, k.double(), cos.double(), sin.double())[0].sum()).backward()
    torch.testing.assert_close(qr.grad.double(), q64.grad, rtol=1e-6, atol=1e-6)
    assert kr.grad is None


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_gradcheck_float64(interleaved):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 4, 6, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(2, 1, 4, 6, generator=g, dtype=F64, requires_grad=True)
    cos, sin = cos_sin(2, 4, 4, F64, interleaved)  # partial: 4 of 6 columns
    assert torch.autograd.gradcheck(lambda q, k: ops.apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved),
                                    (q, k))


def test_deterministic_and_thread_independent():
    q, k, dq, dk = _qk(4, 8, 2, 100, 64, F32, "bthd")
    cos, sin = cos_sin(4, 100, 64, F32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            runs.append(_run(ops.apply_rotary_pos_emb, q, k, cos, sin, dq, dk))
    finally:
        torch.set_num_threads(threads)
    for first, *others in zip(*runs):
        assert all(torch.equal(first, o) for o in others)


def test_empty():
    q = torch.randn(2, 3, 0, 8, requires_grad=True)
    cos, sin = torch.randn(2, 0, 8), torch.randn(2, 0, 8)
    qe, ke = ops.apply_rotary_pos_emb(q, q, cos, sin)
    (qe.sum() + ke.sum()).backward()
    assert qe.shape == q.shape and q.grad.shape == q.shape


def test_opcheck():
    from torch.library import opcheck

    q, k, dq, dk = _qk(2, 4, 2, 5, 16, F32, "bthd")
    cos, sin = (t.unsqueeze(1) for t in cos_sin(2, 5, 16, F32))
    for interleaved in (False, True):
        opcheck(torch.ops.nanofast.rotary_fwd.default, (q.requires_grad_(), k.requires_grad_(), cos, sin, interleaved))
        opcheck(torch.ops.nanofast.rotary_bwd.default, (dq.float(), dk.float(), cos, sin, interleaved, F32))
    opcheck(torch.ops.nanofast.rotary_bwd.default, (None, dk.float().transpose(2, 3).contiguous().transpose(2, 3)
                                                    .transpose(1, 2), cos.transpose(1, 2), sin.transpose(1, 2), False,
                                                    F32))
    qb = q.detach().bfloat16()[..., ::2]  # bf16 rows with float32 cos (a float32 result); a packed last dim
    opcheck(torch.ops.nanofast.rotary_fwd.default, (qb, qb, cos[..., :8], sin[..., :8], False))


@pytest.mark.parametrize("call,match", [
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k, c.requires_grad_(), s), "cos requires grad"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k, c, s[..., :6]), r"sin has shape \(2, 5, 6\)"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k, c[..., :5], s[..., :5]), "even last dim of at most"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q[..., :6], k[..., :6], c, s), "even last dim of at most q's head"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k[..., :4], c, s), "k's head dim must equal q's"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k, c.double(), s.double()), "cos has dtype torch.float64"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k.double(), c, s), "k has dtype torch.float64"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k, c[:1, :4], s[:1, :4]), "does not broadcast over q"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k, c, s, unsqueeze_dim=7), "unsqueeze_dim 7"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q[None], k[None], c, s), "1 to 4 dims"),
    (lambda q, k, c, s: ops.apply_rotary_pos_emb(q, k, c, s, unsqueeze_dim=2), "does not broadcast"),
])
def test_bad_input(call, match):
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = cos_sin(2, 5, 8, F32)
    with pytest.raises((TypeError, ValueError, NotImplementedError), match=match):
        call(q, k, cos, sin)
