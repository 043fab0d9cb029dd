"""The rotary position embedding of q and k in Triton, one launch for both: forward and backward.

Over the first R columns of each row, out = x * cos + rotate(x) * sin, rotate being Hugging Face's
rotate_half ((-x2, x1) over the two halves) or, interleaved, GPT-J's and Meta's rotation of each pair
(2i, 2i + 1); the columns past R are copied. The backward applies the transpose (the rotation by
-theta), each sin moving to its partner's column with its sign flipped. cos and sin are given by the
caller (position ids already applied), broadcast over the rows as their strides say (0 where they
broadcast). Arithmetic in float32; the output dtype is the caller's (q's and cos's promotion forward,
q's backward).

q and k are (n0, n1, n2, D) rows with any strides and a unit last one: programs [0, NBQ) take q's
blocks of rows, the others k's.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, check_device, device_guard, direct, is_interpreted, next_pow2


@triton.jit
def _rope_rows(X, O, COS, SIN, blk, N, n1, n2, sx0, sx1, sx2, so0, so1, so2, sc0, sc1, sc2, D, R,
               INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_P: tl.constexpr):
    rows = (blk * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < N
    i2 = rows % n2
    i1 = (rows // n2) % n1
    i0 = rows // (n2 * n1)
    xr = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    orow = (i0 * so0 + i1 * so1 + i2 * so2)[:, None]
    cr = (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None]
    j = tl.arange(0, BLOCK_H)
    mask = row_mask[:, None] & (j < R // 2)[None, :]
    if INTERLEAVED:  # the pair (2j, 2j + 1)
        ca, cb = 2 * j[None, :], 2 * j[None, :] + 1
    else:  # the pair (j, j + R / 2)
        ca, cb = j[None, :], j[None, :] + R // 2
    xa = tl.load(X + xr + ca, mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(X + xr + cb, mask=mask, other=0.0).to(tl.float32)
    cos_a = tl.load(COS + cr + ca, mask=mask, other=0.0).to(tl.float32)
    cos_b = tl.load(COS + cr + cb, mask=mask, other=0.0).to(tl.float32)
    sin_a = tl.load(SIN + cr + ca, mask=mask, other=0.0).to(tl.float32)
    sin_b = tl.load(SIN + cr + cb, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        oa = xa * cos_a + xb * sin_b
        ob = xb * cos_b - xa * sin_a
    else:
        oa = xa * cos_a - xb * sin_a
        ob = xb * cos_b + xa * sin_b
    tl.store(O + orow + ca, oa.to(O.dtype.element_ty), mask=mask)
    tl.store(O + orow + cb, ob.to(O.dtype.element_ty), mask=mask)
    if BLOCK_P > 0:  # the columns past R, copied
        for c0 in range(R, D, BLOCK_P):
            c = c0 + tl.arange(0, BLOCK_P)
            pmask = row_mask[:, None] & (c < D)[None, :]
            v = tl.load(X + xr + c[None, :], mask=pmask, other=0.0)
            tl.store(O + orow + c[None, :], v.to(O.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_kernel(
    Q, OQ, K, OK, COS, SIN,
    NQ, q1, q2, sq0, sq1, sq2, soq0, soq1, soq2, scq0, scq1, scq2,  # q: rows, sizes, strides of q, out, cos
    NK, k1, k2, sk0, sk1, sk2, sok0, sok1, sok2, sck0, sck1, sck2,  # the same for k
    NBQ,  # q's blocks of rows: the programs before it take q, the others k
    D, R,
    INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < NBQ:
        _rope_rows(Q, OQ, COS, SIN, pid, NQ, q1, q2, sq0, sq1, sq2, soq0, soq1, soq2, scq0, scq1, scq2, D, R,
                   INTERLEAVED, BACKWARD, BLOCK_M, BLOCK_H, BLOCK_P)
    else:
        _rope_rows(K, OK, COS, SIN, pid - NBQ, NK, k1, k2, sk0, sk1, sk2, sok0, sok1, sok2, sck0, sck1, sck2, D, R,
                   INTERLEAVED, BACKWARD, BLOCK_M, BLOCK_H, BLOCK_P)


def _as_4d(t):
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _empty_rows_like(t, dtype):
    from nanofast._layout import empty_rows_like  # the layout the CPU backend and the fakes give too
    return empty_rows_like(t, dtype)


def _rotary(q, k, cos, sin, interleaved, backward, out_dtype, launch):
    src = q if q is not None else k
    check_device("q", src, is_interpreted(_rope_kernel))
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    R, D = cos.shape[-1], src.shape[-1]
    cos4 = _as_4d(cos)
    outs, blocks = [], []
    BLOCK_M = 16 if src.is_cuda else 4
    for t in (q, k):
        if t is None or t.numel() == 0:
            outs.append(cos.new_empty((0,), dtype=out_dtype) if t is None else torch.empty_like(t, dtype=out_dtype))
            blocks.append((None, None, 0, (1, 1), (0,) * 9))
            continue
        t4 = _as_4d(t)
        out = _empty_rows_like(t, out_dtype)
        outs.append(out)
        c4 = cos4.expand(*t4.shape[:3], R)
        n = t4.shape[0] * t4.shape[1] * t4.shape[2]
        blocks.append((t4, _as_4d(out), n, tuple(t4.shape[1:3]), t4.stride()[:3] + _as_4d(out).stride()[:3] +
                       c4.stride()[:3]))
    (tq, oq, nq, szq, stq), (tk, ok, nk, szk, stk) = blocks
    nbq, nbk = cdiv(nq, BLOCK_M), cdiv(nk, BLOCK_M)
    if nbq + nbk == 0:
        return outs[0], outs[1]
    dummy = tq if tq is not None else tk
    with device_guard(src):
        launch(_rope_kernel)[(nbq + nbk,)](
            dummy if tq is None else tq, dummy if oq is None else oq, dummy if tk is None else tk,
            dummy if ok is None else ok, cos, sin,
            nq, *szq, *stq, nk, *szk, *stk, nbq, D, R,
            INTERLEAVED=bool(interleaved), BACKWARD=backward, BLOCK_M=BLOCK_M, BLOCK_H=next_pow2(max(R // 2, 1)),
            BLOCK_P=0 if R == D else min(next_pow2(D - R), 128), num_warps=4,
        )
    return outs[0], outs[1]


def rotary_forward(q, k, cos, sin, interleaved, *, launch=direct):
    """(q * cos + rotate(q) * sin, the same for k) over the first R = cos.shape[-1] columns, the others
    copied, in the dtype q's and cos's promote to, laid out as q and k where they are dense. q and k
    have up to 4 dims and a unit last stride; cos and sin have q's number of dims and broadcast over
    each one's leading dims. ``launch`` wraps the kernel before its launch (_common.direct). The
    arguments are checked by the callers (nanofast.ops.checks)."""
    return _rotary(q, k, cos, sin, interleaved, False, torch.promote_types(q.dtype, cos.dtype), launch)


def rotary_backward(dq, dk, cos, sin, interleaved, dtype, *, launch=direct):
    """The inputs' gradients in dtype: the transposed rotation of dq and dk, either of which may be None
    (an empty (0,) result)."""
    return _rotary(dq, dk, cos, sin, interleaved, True, dtype, launch)
