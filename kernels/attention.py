"""Flash attention (FlashAttention-2) in Triton: forward, deterministic backward, in-kernel dropout.

Tensors are (B, H, T, D) with any strides (each of b, h, t, d is passed to the kernels). Scores are
S = scale * Q K^T; the causal mask keeps key j for query i iff j <= i (top-left aligned, like torch's
``is_causal``), so Tq may differ from Tk. The softmax runs in base 2 (exp2 is one instruction on a
GPU): S is multiplied by scale * log2(e), and the saved log-sum-exp is converted back to natural log.

Beyond the causal mask: an attention mask tensor (bool, or additive) read through its (B, H, Tq, Tk)
strides, 0 on the dims it is broadcast over; a sliding window (query i sees keys i - window < j <= i);
and grouped-query attention, K and V having Hkv heads that H // Hkv query heads each read. A query
that sees no key gets zeros and lse = +inf, as torch's softmax gives zeros there.

Forward: one program per (query block, batch*head); it streams key/value blocks through an online
softmax. Key blocks that need no positional mask (seen whole by every row and inside Tk) run in a
loop without masking; only the window's edge, the diagonal and the tail blocks pay for it. A key
block the mask tensor leaves out entirely is skipped (padding, a window passed as a mask).

Backward: a preprocess computes Delta = rowsum(dO * O); one kernel owns a key block of a key/value
head and loops over its query heads and their query blocks to produce dK and dV; another owns a query
block and loops over key blocks to produce dQ. Every output element is written by exactly one
program, so there are no atomics and repeated runs are bitwise equal.

Dropout acts on the normalised probabilities P, after the row normaliser l (which uses the undropped
P). Element (b, h, i, j) keeps iff tl.rand(seed, ((b*H + h)*Tq + i)*Tk + j) >= p, the offset in int64
so that Philox's second counter word carries the high bits, exactly as the C++ CPU kernel and
tests/philox_ref.py do; kept values are scaled by 1/(1-p). The backward regenerates the mask with
the same helper, so nothing but the seed is saved.
"""
import os

import torch
import triton
import triton.language as tl

from nanofast._layout import empty_bthd, empty_grad_like, mask_strides

from ._common import cdiv, check_device, device_guard, direct, is_interpreted, next_pow2

_LOG2E = 1.4426950408889634
# Triton compiles a variant per "is this int divisible by 16 / equal to 1" pattern of its arguments.
# The sizes gain nothing from that (addresses come from the strides), so they are left unspecialised:
# fewer compilations when sequence lengths vary. Strides stay specialised (a unit head-dim stride and
# 16-aligned rows give vectorised loads).
_NO_SPECIALIZE = ["H", "GROUP", "Tq", "Tk", "window"]


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------

@triton.jit
def _fp32(x):
    """A float argument in float32. torch.compile passes Python floats to the kernels it launches as
    float64 scalars (Triton's own launcher as float32), and float64 would spread through the tile
    arithmetic into the float32-only math functions."""
    return tl.cast(x, tl.float32)


@triton.jit
def _dropout_keep(seed, bh, rows, cols, Tq, Tk, p):
    """True where element (bh, rows, cols) of the (B*H, Tq, Tk) score matrix survives dropout.

    rows and cols are index tensors that broadcast against each other (rows[:, None], cols[None, :]
    for a score tile, the other way round for a transposed tile). The offset is built in int64 before
    any product can overflow, and tl.rand then feeds its high word into Philox's second counter.
    """
    offs = (bh.to(tl.int64) * Tq + rows) * Tk + cols
    return tl.rand(seed, offs) >= p


@triton.jit
def _mask_bias(mask_base, q_idx, k_idx, Tq, Tk, stride_mq, stride_mk, MASK_KIND: tl.constexpr):
    """The attention mask's tile, as added to base-2 scores: 0 or -inf for a bool mask (MASK_KIND 1),
    the values times log2(e) for an additive one (2); -inf outside the (Tq, Tk) scores. q_idx and k_idx
    broadcast to the tile's orientation, as in _bwd_probs."""
    inside = (q_idx < Tq) & (k_idx < Tk)
    ptrs = mask_base + q_idx.to(tl.int64) * stride_mq + k_idx.to(tl.int64) * stride_mk
    if MASK_KIND == 1:
        return tl.where(tl.load(ptrs, mask=inside, other=0) != 0, 0.0, float("-inf"))
    else:
        return tl.load(ptrs, mask=inside, other=float("-inf")).to(tl.float32) * 1.4426950408889634


@triton.jit
def _any_seen(bias):
    """Whether a mask tile lets any key through (a tile it leaves out costs no products). A NaN in an
    additive mask counts as seen, so that it reaches the output as torch's softmax carries it."""
    return tl.sum((bias != float("-inf")).to(tl.int32)) > 0


@triton.jit
def _seen_scores(s, bias, q_idx, k_idx, Tq, Tk, window,
                 MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr):
    """A base-2 score tile with the keys each query does not see at -inf. With MASK (the blocks the
    diagonal, the window's edge or a tail crosses): keys outside (Tq, Tk), after the query (causal),
    or window or more before it. With a mask tensor: its bias added, and its left-out keys replaced
    (as masked_fill replaces them: a NaN score there stays out)."""
    if MASK:
        seen = (q_idx < Tq) & (k_idx < Tk)
        if IS_CAUSAL:
            seen = seen & (k_idx <= q_idx)
        if HAS_WINDOW:
            seen = seen & (k_idx > q_idx - window)
        s = tl.where(seen, s, float("-inf"))
    if MASK_KIND != 0:
        s = tl.where(bias == float("-inf"), float("-inf"), s + bias)
    return s


@triton.jit
def _bwd_probs(s, bias, lse2, dp, q_idx, k_idx, bh, Tq, Tk, window, seed, dropout_p, drop_scale,
               MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
               HAS_DROPOUT: tl.constexpr):
    """The backward's view of one score tile: (P, P as dropout applied it, dP through dropout).

    s holds scores already multiplied by scale * log2(e), bias the mask tensor's tile (_mask_bias),
    lse2 the rows' log-sum-exp in base 2 (+inf for a row that sees no key), dp the gradient of the
    dropped probabilities (dO V^T). q_idx and k_idx are the query and key index tensors, broadcast to
    the tile's orientation: both backward kernels call this, one on score tiles (queries down) and one
    on transposed ones (keys down)."""
    if MASK or MASK_KIND != 0:
        s = _seen_scores(s, bias, q_idx, k_idx, Tq, Tk, window, MASK, IS_CAUSAL, HAS_WINDOW, MASK_KIND)
        p = tl.where(s == float("-inf"), 0.0, tl.math.exp2(s - lse2))
    else:
        p = tl.math.exp2(s - lse2)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, q_idx, k_idx, Tq, Tk, dropout_p)
        return p, tl.where(keep, p * drop_scale, 0.0), tl.where(keep, dp * drop_scale, 0.0)
    return p, p, dp


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST works around Triton's interpreter, which multiplies bfloat16 tiles as raw 16-bit
    # integers; on a GPU it is False and the tensor cores take the native type.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _key_ranges(start_m, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr):
    """The key blocks a query block [start_m, start_m + BLOCK_M) reads, as three ranges of multiples of
    BLOCK_N: [n_lo, n_mid) masked (the window's edge), [n_mid, n_full) seen whole by every row and
    inside Tk (no mask), [n_tail, n_hi) masked (the causal diagonal and the key tail). Keys before n_lo
    and from n_hi on are seen by no row of the block."""
    if IS_CAUSAL:  # key block [j, j + BLOCK_N) is seen whole by every row iff j + BLOCK_N - 1 <= start_m
        n_hi = tl.minimum(Tk, start_m + BLOCK_M)
        n_full = (tl.minimum(start_m + 1, Tk) // BLOCK_N) * BLOCK_N
    else:
        n_hi = Tk
        n_full = (Tk // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:  # row i sees keys from i - window + 1 on: the first row the fewest, the last the most
        n_lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
        n_win = tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
        n_mid = tl.minimum(tl.maximum(n_win, n_lo), n_full)
        n_tail = tl.maximum(n_full, n_lo)
    else:
        n_lo = 0
        n_mid = 0
        n_tail = n_full
    return n_lo, n_mid, n_full, n_tail, n_hi


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_block(
    acc, l_i, m_i, q, bias, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    start_n, n_hi, offs_m, offs_n, offs_d,
    bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key block through the online softmax."""
    d_mask = offs_d < HEAD_DIM
    cols = start_n + offs_n
    if MASK:
        kv_mask = cols < Tk
    else:
        kv_mask = cols < n_hi  # always true here; keeps the load's mask shape uniform
    # K is read transposed, (BLOCK_D, BLOCK_N), so the dot needs no layout shuffle.
    kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                 mask=kv_mask[None, :] & d_mask[:, None], other=0.0)
    s = _dot(q, kT, None, DOT_PREC, UPCAST) * qk_scale
    s = _seen_scores(s, bias, offs_m[:, None], cols[None, :], Tq, Tk, window, MASK, IS_CAUSAL, HAS_WINDOW,
                     MASK_KIND)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen only masked keys keeps m = -inf; subtracting -inf from -inf would give
    # NaN, so such rows subtract 0 instead (their p and alpha are 0 either way).
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    # The normaliser sums the undropped probabilities: dropout acts after the softmax.
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], cols[None, :], Tq, Tk, dropout_p)
        p = tl.where(keep, p * drop_scale, 0.0)
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
    acc = _dot(p.to(v.dtype), v, acc, DOT_PREC, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base,  # pointers to K and V of this (batch, head)
    mask_base,  # pointer to the mask tensor's (batch, head), read only with MASK_KIND
    stride_kt, stride_kd, stride_vt, stride_vd, stride_mq, stride_mk,
    n_lo, n_hi,  # key range [n_lo, n_hi), n_lo a multiple of BLOCK_N
    offs_m, offs_n, offs_d,
    bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,  # apply the positional masks (diagonal, window edge and tail blocks only)
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    for start_n in range(n_lo, n_hi, BLOCK_N):
        if MASK_KIND == 0:
            acc, l_i, m_i = _attn_fwd_block(
                acc, l_i, m_i, q, 0.0, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                start_n, n_hi, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
                HEAD_DIM, MASK, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
        else:
            bias = _mask_bias(mask_base, offs_m[:, None], (start_n + offs_n)[None, :], Tq, Tk, stride_mq, stride_mk,
                              MASK_KIND)
            if _any_seen(bias):
                acc, l_i, m_i = _attn_fwd_block(
                    acc, l_i, m_i, q, bias, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    start_n, n_hi, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
                    HEAD_DIM, MASK, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd_kernel(
    Q, K, V,  # pointers to the inputs, (B, H, Tq, D) and (B, Hkv, Tk, D), strided
    O,  # pointer to the output, (B, H, Tq, D), strided
    LSE,  # pointer to the log-sum-exp of each score row, (B, H, Tq) float32 contiguous, natural log
    MASKP,  # pointer to the attention mask, read as (B, H, Tq, Tk) through its strides (0: broadcast)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_mh, stride_mq, stride_mk,
    H, GROUP, Tq, Tk,  # GROUP = H // Hkv query heads per key/value head
    window,  # the sliding window, read only with HAS_WINDOW
    qk_scale,  # scale * log2(e)
    SEED,  # pointer to the int64 dropout seed, read only with HAS_DROPOUT (see _seed_tensor)
    dropout_p, drop_scale,  # drop probability and 1/(1-p) (0 when p == 1)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0: no mask tensor, 1: bool, 2: additive
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    qk_scale, dropout_p, drop_scale = _fp32(qk_scale), _fp32(dropout_p), _fp32(drop_scale)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m < Tq)[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = MASKP + b * stride_mb + h * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_lo, n_mid, n_full, n_tail, n_hi = _key_ranges(start_m, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_WINDOW:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq,
            stride_mk, n_lo, n_mid, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
            HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq,
        stride_mk, n_mid, n_full, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
        HEAD_DIM, BLOCK_N, False, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq,
        stride_mk, n_tail, n_hi, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
        HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)

    # A row that saw no key (l_i = 0: every key masked out) gets zeros, as torch's softmax over such a
    # row gives, and lse = +inf, so that the backward's exp2(s - lse) is 0 on it; rows past Tq are never
    # stored. A NaN l_i (a NaN score) stays NaN, so that lse carries it into the backward as torch's
    # softmax does.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=q_mask)
    lse = tl.where(l_i == 0.0, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # natural log
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # pointers to the forward output and its gradient, (B, H, Tq, D), strided
    Delta,  # pointer to rowsum(dO * O), (B, H, Tq) float32 contiguous
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dkdv_block(
    dk, dv, k, v, bias,
    q_base, do_base,  # pointers to Q and dO of this (batch, head)
    lse_base, delta_base,  # pointers to this (batch, head)'s rows of LSE and Delta
    stride_qt, stride_qd, stride_dot, stride_dod,
    start_m, m_hi, offs_n, offs_m, offs_d,  # offs_n: this program's key indices
    bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One query block's share of dK and dV, on transposed score tiles, (BLOCK_N keys, BLOCK_M
    queries), so that dV += P^T dO and dK += dS^T Q are plain dots."""
    d_mask = offs_d < HEAD_DIM
    rows = start_m + offs_m
    if MASK:
        q_rows = rows < Tq
    else:
        q_rows = rows < m_hi  # always true here
    qT = tl.load(q_base + rows[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                 mask=q_rows[None, :] & d_mask[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=q_rows[:, None] & d_mask[None, :], other=0.0)
    lse2 = tl.load(lse_base + rows, mask=q_rows, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_base + rows, mask=q_rows, other=0.0)
    sT = _dot(k, qT, None, DOT_PREC, UPCAST) * qk_scale
    dpT = _dot(v, tl.trans(do), None, DOT_PREC, UPCAST)
    pT, pdT, dpT = _bwd_probs(sT, bias, lse2[None, :], dpT, rows[None, :], offs_n[:, None], bh, Tq, Tk, window, seed,
                              dropout_p, drop_scale, MASK, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT)
    dv = _dot(pdT.to(do.dtype), do, dv, DOT_PREC, UPCAST)
    # dS = P * (dP - Delta), where dP is the gradient w.r.t. the undropped P and
    # Delta = rowsum(dO * O) = rowsum(P * dP) also holds with dropout.
    dsT = pT * (dpT - delta[None, :])
    dk = _dot(dsT.to(qT.dtype), tl.trans(qT), dk, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, mask_base,
    stride_qt, stride_qd, stride_dot, stride_dod, stride_mq, stride_mk,
    m_lo, m_hi,  # query range [m_lo, m_hi), m_lo a multiple of BLOCK_M
    offs_n, offs_m, offs_d,
    bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    for start_m in range(m_lo, m_hi, BLOCK_M):
        if MASK_KIND == 0:
            dk, dv = _attn_bwd_dkdv_block(
                dk, dv, k, v, 0.0, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot, stride_dod,
                start_m, m_hi, offs_n, offs_m, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
                HEAD_DIM, MASK, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
        else:
            bias = _mask_bias(mask_base, (start_m + offs_m)[None, :], offs_n[:, None], Tq, Tk, stride_mq, stride_mk,
                              MASK_KIND)
            if _any_seen(bias):
                dk, dv = _attn_bwd_dkdv_block(
                    dk, dv, k, v, bias, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot,
                    stride_dod, start_m, m_hi, offs_n, offs_m, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p,
                    drop_scale, HEAD_DIM, MASK, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # pointers to the inputs and the output gradient, strided
    LSE, Delta,  # pointers to (B, H, Tq) float32 contiguous
    MASKP,  # pointer to the attention mask, as in _attn_fwd_kernel
    DK, DV,  # pointers to the key/value gradients, (B, Hkv, Tk, D), strided
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    H, GROUP, Tq, Tk, window,
    sm_scale, qk_scale,  # scale, and scale * log2(e)
    SEED, dropout_p, drop_scale,  # as in _attn_fwd_kernel
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    sm_scale, qk_scale, dropout_p, drop_scale = _fp32(sm_scale), _fp32(qk_scale), _fp32(dropout_p), _fp32(drop_scale)
    # One program per key block of one key/value head: it loops over the GROUP query heads that read
    # the head, in order, so dK and dV sum over them in registers (no atomics, no copies of K and V).
    start_n = tl.program_id(0) * BLOCK_N
    bg = tl.program_id(1)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    Hkv = H // GROUP
    b = (bg // Hkv).to(tl.int64)
    g = (bg % Hkv).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < Tk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + g * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + g * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks in three ranges: [m_lo, m_diag) straddle the diagonal (masked), [m_diag, m_free)
    # need no mask, [m_free, m_end) hold the window's far edge and the query tail (masked). A key block
    # that runs past Tk masks everything (m_free = m_diag).
    m_ceil = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # Queries i < start_n see none of these keys; from start_n + BLOCK_N - 1 on they see all.
        m_lo = tl.minimum((start_n // BLOCK_M) * BLOCK_M, m_ceil)
        m_diag = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, m_ceil)
    else:
        m_lo = 0
        m_diag = 0
    # (A select, not an if: both sides must have one type for the compiler.)
    m_full = tl.where(start_n + BLOCK_N <= Tk, tl.maximum((Tq // BLOCK_M) * BLOCK_M, m_diag), m_diag)
    if HAS_WINDOW:
        # Queries up to start_n + window - 1 see these keys' start; from start_n + BLOCK_N - 1 + window on, none.
        m_free = tl.maximum(tl.minimum(((start_n + window) // BLOCK_M) * BLOCK_M, m_full), m_diag)
        m_end = tl.minimum(start_n + BLOCK_N - 1 + window, Tq)
    else:
        m_free = m_full
        m_end = Tq
    for hh in range(0, GROUP):
        h = g * GROUP + hh
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * Tq
        delta_base = Delta + bh * Tq
        mask_base = MASKP + b * stride_mb + h * stride_mh
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, stride_qt, stride_qd, stride_dot,
            stride_dod, stride_mq, stride_mk, m_lo, m_diag, offs_n, offs_m, offs_d, bh, Tq, Tk, window, qk_scale,
            seed, dropout_p, drop_scale, HEAD_DIM, BLOCK_M, True, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT,
            DOT_PREC, UPCAST)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, stride_qt, stride_qd, stride_dot,
            stride_dod, stride_mq, stride_mk, m_diag, m_free, offs_n, offs_m, offs_d, bh, Tq, Tk, window, qk_scale,
            seed, dropout_p, drop_scale, HEAD_DIM, BLOCK_M, False, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT,
            DOT_PREC, UPCAST)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, stride_qt, stride_qd, stride_dot,
            stride_dod, stride_mq, stride_mk, m_free, m_end, offs_n, offs_m, offs_d, bh, Tq, Tk, window, qk_scale,
            seed, dropout_p, drop_scale, HEAD_DIM, BLOCK_M, True, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT,
            DOT_PREC, UPCAST)

    dk = dk * sm_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
    tl.store(DK + b * stride_dkb + g * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + g * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_block(
    dq, q, do, lse2, delta, bias,
    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    start_n, n_hi, offs_m, offs_n, offs_d,
    bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key block's share of dQ."""
    d_mask = offs_d < HEAD_DIM
    cols = start_n + offs_n
    if MASK:
        kv_mask = cols < Tk
    else:
        kv_mask = cols < n_hi  # always true here
    kT = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                 mask=kv_mask[None, :] & d_mask[:, None], other=0.0)
    vT = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None] * stride_vd,
                 mask=kv_mask[None, :] & d_mask[:, None], other=0.0)
    s = _dot(q, kT, None, DOT_PREC, UPCAST) * qk_scale
    dp = _dot(do, vT, None, DOT_PREC, UPCAST)
    p, _, dp = _bwd_probs(s, bias, lse2[:, None], dp, offs_m[:, None], cols[None, :], bh, Tq, Tk, window, seed,
                          dropout_p, drop_scale, MASK, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(kT.dtype), tl.trans(kT), dq, DOT_PREC, UPCAST)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_base, v_base, mask_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq, stride_mk,
    n_lo, n_hi, offs_m, offs_n, offs_d,
    bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    for start_n in range(n_lo, n_hi, BLOCK_N):
        if MASK_KIND == 0:
            dq = _attn_bwd_dq_block(
                dq, q, do, lse2, delta, 0.0, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                start_n, n_hi, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
                HEAD_DIM, MASK, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
        else:
            bias = _mask_bias(mask_base, offs_m[:, None], (start_n + offs_n)[None, :], Tq, Tk, stride_mq, stride_mk,
                              MASK_KIND)
            if _any_seen(bias):
                dq = _attn_bwd_dq_block(
                    dq, q, do, lse2, delta, bias, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    start_n, n_hi, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
                    HEAD_DIM, MASK, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # pointers to the inputs and the output gradient, strided
    LSE, Delta,  # pointers to (B, H, Tq) float32 contiguous
    MASKP,  # pointer to the attention mask, as in _attn_fwd_kernel
    DQ,  # pointer to the query gradient, (B, H, Tq, D), strided
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    H, GROUP, Tq, Tk, window,
    sm_scale, qk_scale,
    SEED, dropout_p, drop_scale,  # as in _attn_fwd_kernel
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    sm_scale, qk_scale, dropout_p, drop_scale = _fp32(sm_scale), _fp32(qk_scale), _fp32(dropout_p), _fp32(drop_scale)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < Tq
    q_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=row_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = MASKP + b * stride_mb + h * stride_mh
    # The forward's key ranges: the window's edge, the unmasked run, the diagonal and tail blocks.
    n_lo, n_mid, n_full, n_tail, n_hi = _key_ranges(start_m, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_WINDOW:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq,
            stride_mk, n_lo, n_mid, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
            HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq,
        stride_mk, n_mid, n_full, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
        HEAD_DIM, BLOCK_N, False, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq,
        stride_mk, n_tail, n_hi, offs_m, offs_n, offs_d, bh, Tq, Tk, window, qk_scale, seed, dropout_p, drop_scale,
        HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_WINDOW, MASK_KIND, HAS_DROPOUT, DOT_PREC, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------
# Dropout mask (debugging and tests): the same helper the attention kernels call
# --------------------------------------------------------------------------------------------------

@triton.jit
def _dropout_mask_kernel(
    MASK,  # pointer to the output, (n_bh, n_rows, n_cols) int8, contiguous
    SEED, dropout_p,  # pointer to the int64 seed, and the drop probability
    bh0, row0, col0,  # the window's origin inside the (B*H, Tq, Tk) score matrix
    Tq, Tk,  # the full score matrix's sizes, which define the offsets
    n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    dropout_p = _fp32(dropout_p)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh_local = tl.program_id(2)
    seed = tl.load(SEED)
    keep = _dropout_keep(seed, bh0 + bh_local, (row0 + rows)[:, None].to(tl.int64),
                         (col0 + cols)[None, :].to(tl.int64), Tq, Tk, dropout_p)
    out = MASK + (bh_local.to(tl.int64) * n_rows + rows[:, None]) * n_cols + cols[None, :]
    tl.store(out, keep.to(tl.int8), mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


def dropout_mask(seed, batch, heads, q_len, k_len, p, *, device=None, window=None):
    """bool (batch, heads, q_len, k_len): True where attention dropout keeps the element.

    Computed on ``device`` (CUDA by default when available, else CPU under TRITON_INTERPRET=1) by
    the exact helper the attention kernels call. ``window=(bh0, row0, col0, n_bh, n_rows, n_cols)``
    returns just that (n_bh, n_rows, n_cols) window of the (batch*heads, q_len, k_len) mask, so tests
    can reach offsets past 2**32 without allocating the whole matrix.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not is_interpreted(_dropout_mask_kernel) else "cpu"
    device = torch.device(device)
    if window is None:
        window = (0, 0, 0, batch * heads, q_len, k_len)
    bh0, row0, col0, n_bh, n_rows, n_cols = (int(w) for w in window)
    out = torch.empty((n_bh, n_rows, n_cols), dtype=torch.int8, device=device)
    check_device("dropout_mask output", out, is_interpreted(_dropout_mask_kernel))
    if out.numel():
        seed = _seed_tensor(seed, device)
        BLOCK_M, BLOCK_N = (16, 16) if device.type == "cpu" else (32, 128)
        grid = (cdiv(n_rows, BLOCK_M), cdiv(n_cols, BLOCK_N), n_bh)
        with device_guard(out):
            _dropout_mask_kernel[grid](out, seed, float(p), bh0, row0, col0, q_len, k_len, n_rows, n_cols,
                                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    out = out.bool()
    if window[3:] == (batch * heads, q_len, k_len) and window[:3] == (0, 0, 0):
        out = out.view(batch, heads, q_len, k_len)
    return out


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def _use_tf32(tf32):
    if tf32 is None:
        return os.environ.get("NANOFAST_TF32", "0") == "1"
    return bool(tf32)


def _seed_tensor(seed, device):
    """The seed as the kernels read it: a one-element int64 tensor on `device`.

    A tensor (nanofast.ops' seeds, drawn on the device: see nanofast/ops/seed.py) is used as it is,
    so that the launch reads no value on the host and a CUDA graph replays a fresh draw each time. An
    int (0 <= seed < 2**64, checked by the callers) becomes a tensor bit-for-bit (Philox reads it as
    unsigned): seeds from 2**63 on are stored as negative int64 values."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    seed = int(seed)
    return torch.tensor([seed - 2 ** 64 if seed >= 2 ** 63 else seed], dtype=torch.int64, device=device)


# GPU tile configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed by
# (16-bit inputs?, BLOCK_D <= 64?, dropout?). BLOCK_M is the query tile and BLOCK_N the key tile in
# every kernel. The 16-bit entries without dropout are the fastest of bench/gpu_profile.py's sweep on
# an H200 (bf16, causal, two sequence lengths at nanoGPT's B*H*T; each kernel's choice close to the best
# at both). The bf16 entries with dropout and the float32 entries at head dims up to 64 are the fastest
# of a second sweep (dropout's Philox rounds raise register pressure and favour smaller tiles). The rest
# (dropout or float32 at head dims over 64) were chosen by compiling for sm_90 and keeping the largest
# tiles that do not spill registers; untimed.
_GPU_CONFIGS = {
    # 16-bit inputs: tensor-core dots, software-pipelined loads.
    (True, True, False): dict(fwd=(64, 64, 4, 3), dkdv=(32, 64, 4, 3), dq=(64, 64, 4, 3)),
    (True, True, True): dict(fwd=(64, 64, 4, 3), dkdv=(32, 64, 4, 3), dq=(64, 32, 4, 3)),
    (True, False, False): dict(fwd=(64, 64, 4, 3), dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3)),
    (True, False, True): dict(fwd=(128, 32, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 8, 3)),
    # float32: IEEE dots run on FMA units and need many registers per tile; small tiles.
    (False, True, False): dict(fwd=(32, 32, 4, 1), dkdv=(32, 32, 4, 1), dq=(32, 32, 4, 1)),
    (False, True, True): dict(fwd=(64, 32, 8, 1), dkdv=(32, 32, 4, 1), dq=(32, 32, 4, 1)),
    (False, False, False): dict(fwd=(32, 32, 8, 1), dkdv=(32, 32, 8, 1), dq=(32, 32, 8, 1)),
    (False, False, True): dict(fwd=(32, 32, 8, 1), dkdv=(32, 32, 8, 1), dq=(32, 32, 8, 1)),
}


def _config(q, D, kernel, has_dropout):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for kernel in {"fwd", "dkdv", "dq"}."""
    BLOCK_D = max(16, next_pow2(D))  # tl.dot needs every dimension >= 16
    if not q.is_cuda:
        # The interpreter's cost is per tile operation: small blocks keep tests quick and still
        # exercise multi-block loops, tails and the diagonal at sequence lengths of 17 or 33.
        return 16, 16, BLOCK_D, 4, 1
    bm, bn, warps, stages = _GPU_CONFIGS[(q.dtype != torch.float32, BLOCK_D <= 64, bool(has_dropout))][kernel]
    return bm, bn, BLOCK_D, warps, stages


def _strides(t):
    return tuple(t.stride())


def _dot_args(dtype, interpreted, tf32):
    prec = "tf32" if (dtype != torch.float32 or _use_tf32(tf32)) else "ieee"
    upcast = interpreted and dtype == torch.bfloat16
    return prec, upcast


def _dropout_args(dropout_p, seed, like):
    """(has dropout, p, 1/(1-p), the seed pointer): without dropout the kernels read no seed, and
    `like` stands in for it."""
    p = float(dropout_p)
    has = p > 0.0
    # p == 1 drops everything: scale 0 (instead of inf) gives zeros rather than NaN.
    drop_scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return has, p, drop_scale, (_seed_tensor(seed, like.device) if has else like)


def _mask_args(attn_mask, like, B, H, Tq, Tk):
    """(the mask pointer, its (B, H, Tq, Tk) strides, MASK_KIND): without a mask the kernels read none,
    and `like` stands in for it."""
    if attn_mask is None:
        return like, (0, 0, 0, 0), 0
    return attn_mask, mask_strides(attn_mask, B, H, Tq, Tk), 1 if attn_mask.dtype == torch.bool else 2


def attention_forward(q, k, v, is_causal, scale, dropout_p=0.0, seed=0, attn_mask=None, window=0, *, tf32=None,
                      launch=direct):
    """Flash attention forward. Returns (out, lse).

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with Hkv dividing H. out: (B, H, Tq, D) in q's dtype, laid
    out as (B, Tq, H, D) in memory (a transpose(1, 2) view); lse: (B, H, Tq) float32 contiguous, natural
    log of each row's softmax normaliser (with the scale), +inf for a row that sees no key. seed: an
    int or a one-element int64 tensor. attn_mask: None, bool or additive, broadcastable to
    (B, H, Tq, Tk); window: 0 or the sliding window. ``launch`` wraps each kernel before its launch
    (_common.direct). The arguments are checked by the callers (nanofast.ops.checks).
    """
    interpreted = is_interpreted(_attn_fwd_kernel)
    check_device("query", q, interpreted)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    has_dropout, p, drop_scale, seed = _dropout_args(dropout_p, seed, q)
    out = empty_bthd(B, H, Tq, D, q)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() and Tk == 0:  # softmax over no keys: torch returns zeros
        out.zero_()
        lse.fill_(float("-inf"))
    if out.numel() == 0 or Tk == 0:
        return out, lse
    mask, mask_stride, mask_kind = _mask_args(attn_mask, q, B, H, Tq, Tk)
    BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages = _config(q, D, "fwd", has_dropout)
    prec, upcast = _dot_args(q.dtype, interpreted, tf32)
    grid = (cdiv(Tq, BLOCK_M), B * H)
    with device_guard(q):
        launch(_attn_fwd_kernel)[grid](
            q, k, v, out, lse, mask,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *mask_stride,
            H, H // Hkv, Tq, Tk, int(window), float(scale) * _LOG2E, seed, p, drop_scale,
            HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
            IS_CAUSAL=bool(is_causal), HAS_WINDOW=window > 0, MASK_KIND=mask_kind, HAS_DROPOUT=has_dropout,
            DOT_PREC=prec, UPCAST=upcast, num_warps=num_warps, num_stages=num_stages,
        )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p=0.0, seed=0, attn_mask=None, window=0,
                       *, tf32=None, need_dq=True, launch=direct):
    """Flash attention backward. Returns (dq, dk, dv) (dq is None when ``need_dq`` is False).

    Each gradient has its input's shape, dtype and (where the input is dense) memory layout; dk and dv
    sum over each key/value head's query heads. ``out`` and ``lse`` are the forward's results; ``seed``,
    ``dropout_p``, ``attn_mask`` and ``window`` must be the forward's. The arguments are checked by the
    callers (nanofast.ops.checks).
    """
    interpreted = is_interpreted(_attn_bwd_dq_kernel)
    check_device("query", q, interpreted)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    has_dropout, p, drop_scale, seed = _dropout_args(dropout_p, seed, q)
    lse = lse.contiguous()
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    dq = empty_grad_like(q) if need_dq else None
    dk = empty_grad_like(k)
    dv = empty_grad_like(v)
    if Tq == 0 or Tk == 0 or B * H == 0 or D == 0:
        for g in (dq, dk, dv):
            if g is not None:
                g.zero_()
        return dq, dk, dv
    prec, upcast = _dot_args(q.dtype, interpreted, tf32)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    mask, mask_stride, mask_kind = _mask_args(attn_mask, q, B, H, Tq, Tk)
    flags = dict(IS_CAUSAL=bool(is_causal), HAS_WINDOW=window > 0, MASK_KIND=mask_kind, HAS_DROPOUT=has_dropout,
                 DOT_PREC=prec, UPCAST=upcast)
    with device_guard(q):
        BLOCK_M, _, BLOCK_D, _, _ = _config(q, D, "dq", has_dropout)
        launch(_attn_bwd_preprocess_kernel)[(cdiv(Tq, BLOCK_M), B * H)](
            out, dout, delta, *_strides(out), *_strides(dout), H, Tq,
            HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
        # dK, dV: one program per key block of a key/value head, looping over its query heads' blocks.
        BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages = _config(q, D, "dkdv", has_dropout)
        launch(_attn_bwd_dkdv_kernel)[(cdiv(Tk, BLOCK_N), B * Hkv)](
            q, k, v, dout, lse, delta, mask, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv), *mask_stride,
            H, H // Hkv, Tq, Tk, int(window), float(scale), float(scale) * _LOG2E, seed, p, drop_scale,
            HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, **flags,
            num_warps=num_warps, num_stages=num_stages)
        if need_dq:
            # dQ: one program per query block, looping over key blocks.
            BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages = _config(q, D, "dq", has_dropout)
            launch(_attn_bwd_dq_kernel)[(cdiv(Tq, BLOCK_M), B * H)](
                q, k, v, dout, lse, delta, mask, dq,
                *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq), *mask_stride,
                H, H // Hkv, Tq, Tk, int(window), float(scale), float(scale) * _LOG2E, seed, p, drop_scale,
                HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, **flags,
                num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv
