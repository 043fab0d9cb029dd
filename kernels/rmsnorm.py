"""RMSNorm over the last dimension in Triton, optionally fused with the residual add before it:
forward and a deterministic backward.

h = x (+ residual), y = h * rstd * (weight + weight_offset) with rstd = 1 / sqrt(mean(h^2) + eps), the
statistic in float32 whatever the input type. cast_before_weight rounds h * rstd to x's dtype before
the weight multiplies it, as Hugging Face's LlamaRMSNorm does; otherwise y is rounded once (torch's
F.rms_norm; Gemma's (1 + weight) with weight_offset=1).

The tiling is layernorm.py's (its _config): a program normalises BLOCK_M rows, kept in registers when
a row fits one block of BLOCK_N columns, else swept block by block. The backward's programs each own a
group of rows and write one partial row of dweight, summed in a fixed order by layernorm.py's
_sum_partials_kernel: no atomics, so the result is bitwise reproducible.

The launchers take rows of any leading dimensions with a unit last stride; outputs are contiguous in
x's shape. (The module is not called rms_norm.py: a submodule of that name would replace the public
function nanofast.kernels.rms_norm when imported.)
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, check_device, device_guard, direct, is_interpreted, next_pow2, num_programs_hint
from .layernorm import _config, _sum_partials_kernel


@triton.jit
def _weighted(v, X, W, cols, col_mask, weight_offset, HAS_W: tl.constexpr, CAST: tl.constexpr):
    """The normalised tile v (float32) times weight + weight_offset; with CAST, v rounded to the dtype of
    x (the pointer X) first."""
    if CAST:
        v = v.to(X.dtype.element_ty).to(tl.float32)
    if HAS_W:
        v = v * (tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset)[None, :]
    return v


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # the input (N, C), row stride stride_x, column stride 1
    R,  # the residual (N, C), row stride stride_r; a dummy without HAS_RES
    W,  # the weight (C,), or a dummy without HAS_W
    H,  # h = x + residual, (N, C) contiguous; a dummy without HAS_RES
    Y,  # the output (N, C) contiguous
    Rstd,  # (N,) float32
    stride_x, stride_r,
    N, C,
    eps, weight_offset,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, CAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)[:, None]
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h = (x + tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32))
            h = h.to(H.dtype.element_ty)
            tl.store(H + rows64 * C + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)  # the norm is of the h the backward reads back
        ms = tl.math.div_rn(tl.sum(x * x, axis=1), C * 1.0)
        rstd = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), tl.sqrt_rn(ms + eps))
        y = _weighted(x * rstd[:, None], X, W, cols, col_mask, weight_offset, HAS_W, CAST)
        tl.store(Y + rows64 * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # pass 1: the sum of squares (and h, written block by block); pass 2 reads the row back
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < C)[None, :]
            x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                h = x + tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                h = h.to(H.dtype.element_ty)
                tl.store(H + rows64 * C + cols[None, :], h, mask=mask)
                x = h.to(tl.float32)
            acc += x * x
        ms = tl.math.div_rn(tl.sum(acc, axis=1), C * 1.0)
        rstd = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), tl.sqrt_rn(ms + eps))
        if HAS_RES:
            tl.debug_barrier()  # h's stores visible to the threads that read them back
        for c0 in range(0, C, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_mask = cols < C
            mask = row_mask[:, None] & col_mask[None, :]
            if HAS_RES:
                x = tl.load(H + rows64 * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = _weighted(x * rstd[:, None], X, W, cols, col_mask, weight_offset, HAS_W, CAST)
            tl.store(Y + rows64 * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _load_xhat_dy_g(X, DY, W, rows64, cols, mask, col_mask, rstd, stride_x, stride_dy, weight_offset,
                    HAS_W: tl.constexpr):
    """One tile: xhat = x * rstd, dy and g = dy * (weight + weight_offset), in float32."""
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = x * rstd[:, None]
    if HAS_W:
        g = dy * (tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset)[None, :]
    else:
        g = dy
    return xhat, dy, g


@triton.jit
def _store_dx(DX, DH, DRES, rows64, cols, mask, C, dx, HAS_DH: tl.constexpr, HAS_DRES: tl.constexpr):
    """dx (+ dh) in x's dtype, and again in the residual's."""
    if HAS_DH:
        dx += tl.load(DH + rows64 * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows64 * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_DRES:
        tl.store(DRES + rows64 * C + cols[None, :], dx.to(DRES.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # the output gradient (N, C), row stride stride_dy, column stride 1
    DH,  # h's gradient (N, C) contiguous; a dummy without HAS_DH
    X,  # the forward's x, or its h where it had a residual, row stride stride_x
    W,  # the weight (C,), or a dummy without HAS_W
    Rstd,  # (N,) float32
    DX,  # (N, C) contiguous
    DRES,  # the residual's gradient (N, C) contiguous; a dummy without HAS_DRES
    DW_PART,  # the dweight partials (G, C) float32, zero-filled; a dummy without NEED_DW
    stride_dy, stride_x,
    N, C,
    rows_per_prog,  # rows owned by one program, a multiple of BLOCK_M
    weight_offset,
    HAS_DH: tl.constexpr, HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr, CAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    # y = xhat * w with xhat = x * rstd and g = dy * w:
    #   dx = rstd * (g - xhat * mean(g * xhat)),  dw = sum over rows of dy * xhat (xhat as the forward
    #   rounded it before the weight)
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    part_row = pid.to(tl.int64) * C
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < C
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            xhat, dy, g = _load_xhat_dy_g(X, DY, W, rows64, cols, mask, col_mask, rstd, stride_x, stride_dy,
                                          weight_offset, HAS_W)
            m = tl.math.div_rn(tl.sum(g * xhat, axis=1), C * 1.0)
            _store_dx(DX, DH, DRES, rows64, cols, mask, C, (g - xhat * m[:, None]) * rstd[:, None], HAS_DH, HAS_DRES)
            if NEED_DW:
                if CAST:
                    xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
                dw_acc += dy * xhat
        if NEED_DW:
            tl.store(DW_PART + part_row + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    else:
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)[:, None]
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                col_mask = cols < C
                mask = row_mask[:, None] & col_mask[None, :]
                xhat, dy, g = _load_xhat_dy_g(X, DY, W, rows64, cols, mask, col_mask, rstd, stride_x, stride_dy,
                                              weight_offset, HAS_W)
                acc += g * xhat
            m = tl.math.div_rn(tl.sum(acc, axis=1), C * 1.0)
            for c0 in range(0, C, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                col_mask = cols < C
                mask = row_mask[:, None] & col_mask[None, :]
                xhat, dy, g = _load_xhat_dy_g(X, DY, W, rows64, cols, mask, col_mask, rstd, stride_x, stride_dy,
                                              weight_offset, HAS_W)
                _store_dx(DX, DH, DRES, rows64, cols, mask, C, (g - xhat * m[:, None]) * rstd[:, None], HAS_DH,
                          HAS_DRES)
                if NEED_DW:  # this program's own partial row: a read-modify-write without atomics
                    if CAST:
                        xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
                    p = tl.load(DW_PART + part_row + cols, mask=col_mask, other=0.0)
                    tl.store(DW_PART + part_row + cols, p + tl.sum(dy * xhat, axis=0), mask=col_mask)
            tl.debug_barrier()  # the next row block re-reads the partial row


def _rows(t, C):
    """t as (N, C) rows (a view where its strides allow)."""
    return t if t.dim() == 2 else t.reshape(-1, C)


def _packed(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype, *, block_n=None,
                     block_m=None, launch=direct):
    """(h, y, rstd) over the last dimension of x (unit stride, any leading dimensions): h = x + residual
    in x's dtype (empty without a residual), y in out_dtype, both contiguous in x's shape; rstd (N,)
    float32. ``block_n``/``block_m`` override the tiling (tests force the wide-row path with them);
    ``launch`` wraps each kernel before its launch (_common.direct). The arguments are checked by the
    callers (nanofast.ops.checks)."""
    C = x.shape[-1]
    x2d = _rows(x, C)
    N = x2d.shape[0]
    r2d = None if residual is None else _rows(residual, C)
    weight = _packed(weight)
    check_device("x", x, is_interpreted(_rms_norm_fwd_kernel))
    h = torch.empty(x.shape if residual is not None else (0,), dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty((N,), dtype=torch.float32, device=x.device)
    if N == 0 or C == 0:
        return h, y, rstd
    BLOCK_M, BLOCK_N, ONE_BLOCK, num_warps = _config(x, C, block_n, block_m)
    with device_guard(x):
        launch(_rms_norm_fwd_kernel)[(cdiv(N, BLOCK_M),)](
            x2d, x2d if r2d is None else r2d, x2d if weight is None else weight,  # dummies: never read
            x2d if residual is None else h, y, rstd,
            x2d.stride(0), 0 if r2d is None else r2d.stride(0), N, C, float(eps), float(weight_offset),
            HAS_RES=residual is not None, HAS_W=weight is not None, CAST=bool(cast_before_weight),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ONE_BLOCK=ONE_BLOCK, num_warps=num_warps,
        )
    return h, y, rstd


def rms_norm_backward(dy, dh, x, weight, rstd, weight_offset, cast_before_weight, residual_dtype, need_weight_grad,
                      *, block_n=None, block_m=None, num_groups=None, launch=direct):
    """(dx, dresidual, dweight): dx contiguous in x's shape and dtype (x: the forward's h where it had
    a residual of dtype residual_dtype, else residual_dtype is None; dh, h's gradient, may be None);
    dresidual the same values in the residual's dtype, empty without a residual or where that is x's
    dtype (the caller reuses dx); dweight (C,) in the weight's dtype, empty where not needed.
    Deterministic (no atomics)."""
    C = x.shape[-1]
    x2d, dy2d = _rows(x, C), _rows(dy, C)
    N = x2d.shape[0]
    weight, rstd, dh = _packed(weight), _packed(rstd), _packed(dh)
    check_device("x", x, is_interpreted(_rms_norm_bwd_kernel))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    separate = residual_dtype is not None and residual_dtype != x.dtype
    dres = torch.empty(x.shape if separate else (0,), dtype=residual_dtype if separate else x.dtype, device=x.device)
    need_dw = bool(need_weight_grad) and weight is not None
    w_dtype = x.dtype if weight is None else weight.dtype
    if N == 0 or C == 0:
        return dx, dres, torch.zeros((C if need_dw else 0,), dtype=w_dtype, device=x.device)
    BLOCK_M, BLOCK_N, ONE_BLOCK, num_warps = _config(x, C, block_n, block_m)
    groups = num_groups if num_groups is not None else num_programs_hint(x)
    groups = max(1, min(groups, cdiv(N, BLOCK_M)))
    rows_per_prog = cdiv(cdiv(N, groups), BLOCK_M) * BLOCK_M
    G = cdiv(N, rows_per_prog)
    dw_part = torch.zeros((G, C) if need_dw else (0,), dtype=torch.float32, device=x.device)
    dw = torch.empty((C if need_dw else 0,), dtype=w_dtype, device=x.device)
    with device_guard(x):
        launch(_rms_norm_bwd_kernel)[(G,)](
            dy2d, dx if dh is None else dh, x2d, x2d if weight is None else weight, rstd, dx, dres if separate else dx,
            dw_part if need_dw else dx, dy2d.stride(0), x2d.stride(0), N, C, rows_per_prog, float(weight_offset),
            HAS_DH=dh is not None, HAS_DRES=separate, HAS_W=weight is not None, NEED_DW=need_dw,
            CAST=bool(cast_before_weight), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ONE_BLOCK=ONE_BLOCK, num_warps=num_warps,
        )
        if need_dw:
            BLOCK_NP = min(next_pow2(C), 64 if not x.is_cuda else 32)
            BLOCK_G = min(next_pow2(G), 32)
            launch(_sum_partials_kernel)[(cdiv(C, BLOCK_NP),)](dw_part, dw, G, C, BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_NP,
                                                               num_warps=4)
    return dx, dres, dw
