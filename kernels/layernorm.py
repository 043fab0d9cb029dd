"""LayerNorm over the last dimension in Triton: forward and a deterministic backward.

Layout: the input is viewed as a 2-D (N, C) matrix with unit column stride and any row stride.
Each forward program normalises a block of BLOCK_M rows. When a row fits in one block of BLOCK_N
columns (ONE_BLOCK) it is read once and kept in registers; wider rows loop over column blocks
(three passes: mean, variance, normalise) so any width works.

Statistics are accumulated in float32 whatever the input type, and the variance is the two-pass
``mean((x - mean)^2)`` rather than ``E[x^2] - mean^2``, which cancels badly for rows far from zero.
Wide rows are summed in super-blocks combined by trees (SUPER_BLOCKS), so no accumulator runs along a
long row. A finite row whose sums overflow float32 is taken in its own power-of-two scales
(_layer_norm_stats; the backward: _xhat_scales), behind one test per row block.
The forward saves mean and rstd = 1/sqrt(var + eps) (float32, one per row) for the backward.
Divisions and the square root are the correctly rounded div_rn and sqrt_rn: a GPU's default `/` and
tl.sqrt are approximate (2 ulp), which turns mean(x) != x at C = 1 into dx = rstd * 1 ulp, about
1e-5 at eps = 1e-5 where torch gives exactly 0. The rounding costs nothing in a memory-bound kernel.

Backward: each program owns a contiguous group of rows. It writes dx for those rows and one partial
row of dweight and dbias (the sum over its rows) into a (G, C) float32 buffer; a second small kernel
sums the G partial rows in a fixed order. No atomics, so the result is bitwise reproducible.

(The module is not called layer_norm.py: importing a submodule of that name would replace the
public function ``nanofast.kernels.layer_norm`` by the module object.)
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import cdiv, check_device, device_guard, direct, is_interpreted, next_pow2, num_programs_hint

@triton.jit
def _affine(y, W, B, cols, col_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """y * weight + bias over the columns `cols` of a (BLOCK_M, BLOCK_N) tile, in float32."""
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return y


# Rows wider than one block are summed in super-blocks of SUPER_BLOCKS column blocks, each reduced to
# one partial per row by a tree, and the partials are added into PARTIALS slots in turn, then reduced
# by a tree: in a fixed order set by C and BLOCK_N, and no accumulator runs along more than a short
# stretch of the row (one carried across a row of millions of elements loses most of its addends' bits).
SUPER_BLOCKS = tl.constexpr(8)
PARTIALS = tl.constexpr(32)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _exp2i(n):
    """2.0 ** n in float32 for int32 n in [-126, 127]: exact, from the exponent bits."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(a):
    """The e with a < 2 ** e for a finite a >= 0 (from its exponent bits; -126 for 0 and denormals)."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 255) - 126


@triton.jit
def _scaled(x, d1, ms, d2, mask, POW: tl.constexpr):
    """v = (x * d1 - ms) * d2 over a tile (0 in its padding), and v ** POW."""
    v = tl.where(mask, (x * d1[:, None] - ms[:, None]) * d2[:, None], 0.0)
    if POW == 2:
        return v, v * v
    else:
        return v, v


@triton.jit
def _fold(partials, acc, s0, BLOCK_N: tl.constexpr):
    """partials with the super-block starting at column s0 added in: acc's row sums into its slot."""
    slot = (s0 // (BLOCK_N * SUPER_BLOCKS)) % PARTIALS
    return partials + tl.where(tl.arange(0, PARTIALS)[None, :] == slot, tl.sum(acc, axis=1)[:, None], 0.0)


@triton.jit
def _row_moments(x_rows, x, row_mask, C, d1, ms, d2, POW: tl.constexpr, ONE_BLOCK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per row, the sum of v ** POW and the max of |v|, v = (x * d1 - ms) * d2: from the tile x when the
    row is one block, else read from x_rows block by block and summed as SUPER_BLOCKS describes."""
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        v, p = _scaled(x, d1, ms, d2, row_mask[:, None] & (cols < C)[None, :], POW)
        return tl.sum(p, axis=1), tl.max(tl.abs(v), axis=1)
    else:
        partials = tl.zeros([BLOCK_M, PARTIALS], dtype=tl.float32)
        vmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for s0 in range(0, C, BLOCK_N * SUPER_BLOCKS):
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c0 in range(s0, tl.minimum(s0 + BLOCK_N * SUPER_BLOCKS, C), BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < C)[None, :]
                xt = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                v, p = _scaled(xt, d1, ms, d2, mask, POW)
                acc += p
                vmax = tl.maximum(vmax, tl.max(tl.abs(v), axis=1))
            partials = _fold(partials, acc, s0, BLOCK_N)
        return tl.sum(partials, axis=1), vmax


@triton.jit
def _layer_norm_stats(x_rows, x, row_mask, C, eps, ONE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """A row block's statistics: (mean, rstd) to save, and (d1, ms, d2, rs) with xhat = (x * d1 - ms) * d2 * rs.

    Ordinary rows: d1 = d2 = 1, ms = mean, rs = rstd (the plain two-pass arithmetic). A finite row whose
    sums overflow (|x| near 1e36 at C = 128, x - mean near +-3e38) is taken in power-of-two scales, the
    row's (d1) and then its deviations' (d2), so that every scaling is exact: normalising is
    scale-invariant. Rows holding inf or NaN keep the plain arithmetic, which propagates them.
    """
    one = tl.full([BLOCK_M], 1.0, tl.float32)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    s1, amax = _row_moments(x_rows, x, row_mask, C, one, zero, one, 1, ONE_BLOCK, BLOCK_M, BLOCK_N)
    mean = tl.math.div_rn(s1, C * 1.0)
    sq, _ = _row_moments(x_rows, x, row_mask, C, one, mean, one, 2, ONE_BLOCK, BLOCK_M, BLOCK_N)
    rstd = tl.math.div_rn(one, tl.sqrt_rn(tl.math.div_rn(sq, C * 1.0) + eps))
    d1, ms, d2, rs = one, mean, one, rstd
    over = row_mask & ~(sq <= FLT_MAX) & (amax <= FLT_MAX)
    if tl.max(over.to(tl.int32), axis=0) > 0:
        e1 = tl.where(over, tl.minimum(_exponent(amax), 126), 0)
        d1 = _exp2i(-e1)
        s1s, _ = _row_moments(x_rows, x, row_mask, C, d1, zero, one, 1, ONE_BLOCK, BLOCK_M, BLOCK_N)
        mss = tl.math.div_rn(s1s, C * 1.0)
        _, dmax = _row_moments(x_rows, x, row_mask, C, d1, mss, one, 1, ONE_BLOCK, BLOCK_M, BLOCK_N)
        e2 = tl.where(over, _exponent(dmax), 0)
        d2s = _exp2i(-e2)
        sqs, _ = _row_moments(x_rows, x, row_mask, C, d1, mss, d2s, 2, ONE_BLOCK, BLOCK_M, BLOCK_N)
        # |x - mean| < 2^e: var + eps = 2^(2e) * (sqs / C + eps * 2^(-2e)); the powers of two in halves
        e = e1 + e2
        ea, eb = e // 2, e - e // 2
        eps_s = eps * _exp2i(-ea) * _exp2i(-ea) * _exp2i(-eb) * _exp2i(-eb)
        flat = dmax == 0  # every deviation 0: xhat = 0 and the variance is eps alone
        rss = tl.where(flat, 0.0, tl.math.div_rn(one, tl.sqrt_rn(tl.math.div_rn(sqs, C * 1.0) + eps_s)))
        e1a = e1 // 2
        mean = tl.where(over, mss * _exp2i(e1a) * _exp2i(e1 - e1a), mean)
        rstd = tl.where(over, tl.where(flat, tl.math.div_rn(one, tl.sqrt_rn(eps)), rss * _exp2i(-ea) * _exp2i(-eb)),
                        rstd)
        ms = tl.where(over, mss, ms)
        d2 = tl.where(over, d2s, one)
        rs = tl.where(over, rss, rs)
    return mean, rstd, d1, ms, d2, rs


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # pointer to the input, (N, C), row stride stride_x, column stride 1
    Y,  # pointer to the output, (N, C), row stride stride_y, column stride 1
    W,  # pointer to the weight (C,), or a dummy when HAS_W is False
    B,  # pointer to the bias (C,), or a dummy when HAS_B is False
    Mean,  # pointer to the saved row means (N,), float32
    Rstd,  # pointer to the saved reciprocal standard deviations (N,), float32
    stride_x, stride_y,  # row strides, in elements
    N, C,  # rows, columns
    eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # True when C <= BLOCK_N: the row stays in registers
):
    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as float64 (see attention._fp32)
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    # int64 row offsets: N * stride can pass 2**31 elements for large activations.
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    y_rows = Y + rows.to(tl.int64)[:, None] * stride_y
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # unused: the passes read the row block by block
    mean, rstd, d1, ms, d2, rs = _layer_norm_stats(x_rows, x, row_mask, C, eps, ONE_BLOCK, BLOCK_M, BLOCK_N)
    # Normalise and write: (x - mean) * rstd for ordinary rows.
    if ONE_BLOCK:
        xhat, _ = _scaled(x, d1, ms, d2, mask, 1)
        y = _affine(xhat * rs[:, None], W, B, cols, col_mask, HAS_W, HAS_B)
        tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        for c0 in range(0, C, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_mask = cols < C
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xhat, _ = _scaled(x, d1, ms, d2, mask, 1)
            y = _affine(xhat * rs[:, None], W, B, cols, col_mask, HAS_W, HAS_B)
            tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _rounded_product(a, b, ON_GPU: tl.constexpr):
    """a * b rounded to float32, which the compiler may not fuse into a later subtraction.

    Fused, g - mean(g) in the backward becomes fma(dy, w, -mean(g)): the exact product minus its
    rounded value. At C = 1 dx should be exactly 0 (torch's is), and that residue times rstd
    (1/sqrt(eps)) gave 1e-5. libdevice's mul_rn is never contracted; the interpreter has no libdevice
    and no contraction either.
    """
    if ON_GPU:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _xhat_scales(mean, rstd):
    """(dn, mean * dn, rstd / dn) with xhat = (x * dn - mean * dn) * (rstd / dn): dn = 1 for ordinary rows
    (the plain (x - mean) * rstd), and the power of two near rstd where rstd < 2^-63, so that x - mean,
    which may then overflow, is taken in the row's scale."""
    k = tl.where((rstd < 1.0842021724855044e-19) & (rstd > 0), tl.minimum(1 - _exponent(rstd), 126), 0)
    dn = _exp2i(-k)
    return dn, mean * dn, rstd * _exp2i(k)


@triton.jit
def _load_xhat_dy_g(X, DY, W, rows64, cols, mask, col_mask, dn, mean_dn, rstd_up, stride_x, stride_dy,
                    HAS_W: tl.constexpr, ON_GPU: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of a wide row block: xhat, dy and g = dy * w, in float32. The
    wide-row backward reads each tile twice (once per pass) rather than keep the row on chip."""
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x * dn[:, None] - mean_dn[:, None]) * rstd_up[:, None], 0.0)
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        g = _rounded_product(dy, tl.broadcast_to(w[None, :], dy.shape), ON_GPU)
    else:
        g = dy
    return xhat, dy, g


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # pointer to the output gradient, (N, C), row stride stride_dy, column stride 1
    X,  # pointer to the forward input, (N, C), row stride stride_x
    W,  # pointer to the weight (C,), or a dummy when HAS_W is False
    Mean, Rstd,  # pointers to the forward's saved statistics (N,), float32
    DX,  # pointer to the input gradient, (N, C), row stride stride_dx
    DW_PART,  # pointer to the dweight partials, (G, C) float32, zero-filled; dummy if not NEED_DW
    DB_PART,  # pointer to the dbias partials, (G, C) float32, zero-filled; dummy if not NEED_DB
    stride_dy, stride_x, stride_dx,
    N, C,
    rows_per_prog,  # rows owned by one program, a multiple of BLOCK_M
    HAS_W: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    ON_GPU: tl.constexpr,  # compiled for a GPU (not Triton's interpreter)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    # y = xhat * w + b with xhat = (x - mean) * rstd. With g = dy * w:
    #   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (means over the row)
    #   dw = sum over rows of dy * xhat,  db = sum over rows of dy.
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    part_row = pid.to(tl.int64) * C
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < C
        if HAS_W:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        # Tile-shaped accumulators, reduced over rows once at the end: a fixed summation order.
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            dn, mean_dn, rstd_up = _xhat_scales(mean, rstd)
            xhat = tl.where(mask, (x * dn[:, None] - mean_dn[:, None]) * rstd_up[:, None], 0.0)
            if HAS_W:
                g = _rounded_product(dy, tl.broadcast_to(w[None, :], dy.shape), ON_GPU)
            else:
                g = dy
            c1 = tl.math.div_rn(tl.sum(xhat * g, axis=1), C * 1.0)
            c2 = tl.math.div_rn(tl.sum(g, axis=1), C * 1.0)
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw_acc += dy * xhat
            if NEED_DB:
                db_acc += dy
        if NEED_DW:
            tl.store(DW_PART + part_row + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if NEED_DB:
            tl.store(DB_PART + part_row + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    else:
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)[:, None]
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            dn, mean_dn, rstd_up = _xhat_scales(mean, rstd)
            # Pass 1: the two row means that dx needs, summed as SUPER_BLOCKS describes.
            part1 = tl.zeros([BLOCK_M, PARTIALS], dtype=tl.float32)
            part2 = tl.zeros([BLOCK_M, PARTIALS], dtype=tl.float32)
            for s0 in range(0, C, BLOCK_N * SUPER_BLOCKS):
                acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for c0 in range(s0, tl.minimum(s0 + BLOCK_N * SUPER_BLOCKS, C), BLOCK_N):
                    cols = c0 + tl.arange(0, BLOCK_N)
                    col_mask = cols < C
                    mask = row_mask[:, None] & col_mask[None, :]
                    xhat, dy, g = _load_xhat_dy_g(X, DY, W, rows64, cols, mask, col_mask, dn, mean_dn, rstd_up,
                                                  stride_x, stride_dy, HAS_W, ON_GPU)
                    acc1 += xhat * g
                    acc2 += g
                part1 = _fold(part1, acc1, s0, BLOCK_N)
                part2 = _fold(part2, acc2, s0, BLOCK_N)
            c1 = tl.math.div_rn(tl.sum(part1, axis=1), C * 1.0)
            c2 = tl.math.div_rn(tl.sum(part2, axis=1), C * 1.0)
            # Pass 2: dx, and this program's partial dweight/dbias row updated in place. The partial
            # row belongs to this program alone, so the read-modify-write needs no atomics.
            for c0 in range(0, C, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                col_mask = cols < C
                mask = row_mask[:, None] & col_mask[None, :]
                xhat, dy, g = _load_xhat_dy_g(X, DY, W, rows64, cols, mask, col_mask, dn, mean_dn, rstd_up,
                                              stride_x, stride_dy, HAS_W, ON_GPU)
                dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                if NEED_DW:
                    p = tl.load(DW_PART + part_row + cols, mask=col_mask, other=0.0)
                    tl.store(DW_PART + part_row + cols, p + tl.sum(dy * xhat, axis=0), mask=col_mask)
                if NEED_DB:
                    p = tl.load(DB_PART + part_row + cols, mask=col_mask, other=0.0)
                    tl.store(DB_PART + part_row + cols, p + tl.sum(dy, axis=0), mask=col_mask)
            # The next row block re-reads the partial row, possibly from other threads of this
            # program: make this block's stores visible to them first.
            tl.debug_barrier()


@triton.jit
def _sum_partials_kernel(
    PART,  # pointer to the partial rows, (G, C) float32, contiguous
    OUT,  # pointer to the result (C,), in the parameter's dtype
    G, C,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Column sums of the partial rows, always in the same order: deterministic.
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < C
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g < G)[:, None] & col_mask[None, :]
        acc += tl.load(PART + g.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------

def _config(x: torch.Tensor, C: int, block_n=None, block_m=None):
    """(BLOCK_M, BLOCK_N, ONE_BLOCK, num_warps) for rows of width C."""
    interpreted = not x.is_cuda
    # The interpreter pays per operation, not per element, but tiny blocks keep the wide-row path
    # exercised by small test shapes; on a GPU a whole row up to 8192 columns stays in registers.
    max_n = 64 if interpreted else 8192
    if block_n is None:
        block_n = min(next_pow2(C), max_n)
    block_n = next_pow2(block_n)
    one_block = C <= block_n
    if block_m is None:
        if interpreted:
            block_m = 16
        else:
            # About 4096 elements per program: enough bytes in flight per SM, few registers per thread.
            block_m = max(1, min(32, 4096 // block_n)) if one_block else 2
    block_m = next_pow2(block_m)
    num_warps = max(1, min(16, (block_m * block_n) // 512))
    return block_m, block_n, one_block, num_warps


def _packed(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def layer_norm_forward(x2d, weight, bias, eps, *, block_n=None, block_m=None, launch=direct):
    """LayerNorm of each row of ``x2d`` (N, C). Returns (y, mean, rstd).

    y is (N, C) contiguous in x2d's dtype; mean and rstd are (N,) float32. weight and bias are (C,)
    or None. ``block_n``/``block_m`` override the heuristics (tests use them to force the wide-row path).
    ``launch`` wraps each kernel before its launch (_common.direct). The arguments are checked by the
    callers (nanofast.ops.checks).
    """
    N, C = x2d.shape
    weight, bias = _packed(weight), _packed(bias)  # the kernel indexes them densely
    check_device("x2d", x2d, is_interpreted(_layer_norm_fwd_kernel))
    y = torch.empty((N, C), dtype=x2d.dtype, device=x2d.device)
    mean = torch.empty((N,), dtype=torch.float32, device=x2d.device)
    rstd = torch.empty((N,), dtype=torch.float32, device=x2d.device)
    if N == 0 or C == 0:  # nothing to normalise (torch returns the empty rows too)
        return y, mean, rstd
    BLOCK_M, BLOCK_N, ONE_BLOCK, num_warps = _config(x2d, C, block_n, block_m)
    grid = (cdiv(N, BLOCK_M),)
    with device_guard(x2d):
        launch(_layer_norm_fwd_kernel)[grid](
            x2d, y,
            weight if weight is not None else x2d,  # dummies: never read when HAS_W/HAS_B is False
            bias if bias is not None else x2d,
            mean, rstd,
            x2d.stride(0), y.stride(0), N, C, float(eps),
            HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ONE_BLOCK=ONE_BLOCK,
            num_warps=num_warps,
        )
    return y, mean, rstd


def layer_norm_backward(dy2d, x2d, weight, mean, rstd, need_weight_grad, need_bias_grad, *,
                        block_n=None, block_m=None, num_groups=None, launch=direct):
    """Gradients of LayerNorm. Returns (dx, dw or None, db or None).

    dx is (N, C) contiguous in x2d's dtype; dw and db are (C,) in the weight's dtype (x2d's dtype when
    there is no weight, e.g. for a bias-only LayerNorm). dw is None unless weight is given and
    ``need_weight_grad``; db is None unless ``need_bias_grad``. The arguments are checked by the
    callers (nanofast.ops.checks).
    """
    N, C = x2d.shape
    weight, mean, rstd = _packed(weight), _packed(mean), _packed(rstd)
    check_device("x2d", x2d, is_interpreted(_layer_norm_bwd_kernel))
    need_dw = bool(need_weight_grad) and weight is not None
    need_db = bool(need_bias_grad)
    param_dtype = weight.dtype if weight is not None else x2d.dtype
    dx = torch.empty((N, C), dtype=x2d.dtype, device=x2d.device)
    if N == 0 or C == 0:
        dw = torch.zeros((C,), dtype=param_dtype, device=x2d.device) if need_dw else None
        db = torch.zeros((C,), dtype=param_dtype, device=x2d.device) if need_db else None
        return dx, dw, db
    BLOCK_M, BLOCK_N, ONE_BLOCK, num_warps = _config(x2d, C, block_n, block_m)
    # Row groups: about num_programs_hint programs, each owning a whole number of row blocks.
    groups = num_groups if num_groups is not None else num_programs_hint(x2d)
    groups = max(1, min(groups, cdiv(N, BLOCK_M)))
    rows_per_prog = cdiv(cdiv(N, groups), BLOCK_M) * BLOCK_M
    G = cdiv(N, rows_per_prog)
    # Zero-filled: the wide-row path accumulates into its partial row in place.
    dw_part = torch.zeros((G, C), dtype=torch.float32, device=x2d.device) if need_dw else None
    db_part = torch.zeros((G, C), dtype=torch.float32, device=x2d.device) if need_db else None
    with device_guard(x2d):
        launch(_layer_norm_bwd_kernel)[(G,)](
            dy2d, x2d,
            weight if weight is not None else x2d,
            mean, rstd, dx,
            dw_part if need_dw else dx, db_part if need_db else dx,
            dy2d.stride(0), x2d.stride(0), dx.stride(0),
            N, C, rows_per_prog,
            HAS_W=weight is not None, NEED_DW=need_dw, NEED_DB=need_db, ON_GPU=x2d.is_cuda,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ONE_BLOCK=ONE_BLOCK,
            num_warps=num_warps,
        )
        dw = _sum_partials(dw_part, param_dtype, launch) if need_dw else None
        db = _sum_partials(db_part, param_dtype, launch) if need_db else None
    return dx, dw, db


def _sum_partials(part, dtype, launch):
    G, C = part.shape
    out = torch.empty((C,), dtype=dtype, device=part.device)
    # One program per BLOCK_N columns, each summing all G rows: narrow blocks make more programs, so
    # that a few wide ones do not leave the GPU idle while they sum hundreds of rows.
    BLOCK_N = min(next_pow2(C), 64 if not part.is_cuda else 32)
    BLOCK_G = min(next_pow2(G), 32)
    launch(_sum_partials_kernel)[(cdiv(C, BLOCK_N),)](part, out, G, C, BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, num_warps=4)
    return out
