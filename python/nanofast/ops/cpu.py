"""The CPU backend: launchers of the C++/OpenMP kernels (nanofast._C), as backend.py describes them.

Tensors in, raw pointers, sizes and strides out: this layer allocates the outputs and translates
tensors into the pointer-and-stride form the C++ side takes. Arguments are checked by the callers
(checks.py), against the capabilities written here.
"""
import functools
import os
import sys
import warnings

import torch

from .. import _C
from .._layout import empty_bthd, empty_grad_like, empty_rows_like, mask_strides
from . import chunked_cross_entropy
from .compose import (composed_add_layer_norm_backward, composed_add_layer_norm_forward, composed_add_rms_norm_backward,
                      composed_add_rms_norm_forward)
from .seed import seed_value

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_MASK_CODE = {**_DTYPE_CODE, torch.bool: 3}

# ---- capabilities (read by checks.py and the ops; see backend.py) ----
NAME = "nanofast's CPU backend"
DTYPES = tuple(_DTYPE_CODE)
MAX_HEAD_DIM = 256
VALUE_HEAD_DIM_MAY_DIFFER = True
LAYER_NORM_PARAMS_ANY_DTYPE = False
MAX_BATCH_HEADS = None
RUNS_DROPOUT = True
RUNS_GELU = True
RUNS_LINEAR = True
# (x, residual, y) dtypes the fused add + LayerNorm kernel takes; add_layer_norm_* compose the others
ADD_LAYER_NORM_DTYPES = frozenset({(torch.float64,) * 3, (torch.bfloat16,) * 3} | {
    (torch.float32, r, y) for r in (torch.float32, torch.bfloat16) for y in (torch.float32, torch.bfloat16)})
# (x, residual, y) dtypes the fused add + RMSNorm kernel takes (add + LayerNorm's); rms_norm_* compose the others
ADD_RMS_NORM_DTYPES = ADD_LAYER_NORM_DTYPES


# ---- ops torch runs on some instruction sets ----
# Where torch's CPU kernel for an op beat nanofast's on an instruction-set build at the training recipes'
# shapes (bench/probes/isa_routes.py, and the whole step: README, "The CPUs people have"), the launchers
# below hand that op, in that dtype, to torch while that build is selected, so that no build makes a
# step slower through it. The portable build ("generic", what an ARM CPU runs) loses GELU and float32
# attention to torch's own vector code (its bfloat16 attention still wins); every kernel of the AVX2
# and AVX-512 builds wins or breaks even. Attention goes to torch only without dropout, mask or window
# (torch's kernel has no counterpart for nanofast's dropout masks). Only ops whose torch kernel gives
# the same bits at any thread count may go: torch's LayerNorm backward, faster on the portable build,
# sums the weight and bias gradients per thread, so LayerNorm stays here. NANOFAST_ISA_ROUTES=0 keeps
# nanofast's kernels on every build (the kernels' own tests set ROUTES_ENABLED).
TORCH_ON_ISA = {
    "generic": frozenset({("gelu", torch.float32), ("gelu", torch.bfloat16), ("attention", torch.float32)}),
}
ROUTES_ENABLED = os.environ.get("NANOFAST_ISA_ROUTES", "1") != "0"


def torch_runs(op, dtype):
    """Whether `op` in `dtype` goes to torch on the selected instruction set (TORCH_ON_ISA)."""
    return ROUTES_ENABLED and (op, dtype) in TORCH_ON_ISA.get(_C.isa(), ())


def _check_forced_isa():
    """NANOFAST_ISA forces an instruction set (csrc/dispatch.cpp); one that this CPU or build lacks, or a
    misspelt name, falls back to the best available, which is said rather than left silent."""
    forced = os.environ.get("NANOFAST_ISA", "")
    if forced and forced != "auto" and forced != _C.isa():
        warnings.warn(f"NANOFAST_ISA={forced!r} is not an instruction set this CPU runs (available: "
                      f"{_C.available_isas()}, or auto): the kernels run {_C.isa()}", RuntimeWarning, stacklevel=2)


_check_forced_isa()


def stats_dtype(dtype):
    """The dtype of LayerNorm's saved mean and rstd, and of attention's log-sum-exp, for inputs of dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _packed(t):
    """t itself if its elements are contiguous (the kernels index it densely), else a packed copy."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _strides3(t):
    return t.stride()[:3]  # one call: the strides are the launchers' main Python cost at small shapes


# ---- threads ----
# The kernels run on torch.get_num_threads() OpenMP threads. GNU OpenMP, the runtime of torch's Linux
# wheels that the kernels share, keeps its worker threads for the life of the process, and fork()
# copies none of them: a child forked after they started (by any parallel CPU op, torch's or
# nanofast's) deadlocks in its first parallel region of more than one thread. So a forked child
# starts with torch's thread count at 1, as DataLoader's workers do (the kernels give the same bits on
# any number of threads); torch.set_num_threads(n) raises it again where the parent never ran one.


def threads():
    """How many threads a kernel runs on: torch's setting."""
    return torch.get_num_threads()


def _after_fork_in_child():
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if sys.platform.startswith("linux"):  # (macOS's libomp and Windows need none of this)
    os.register_at_fork(after_in_child=_after_fork_in_child)


# The two LayerNorm launchers are written out call by call: at nanoGPT's CPU shapes the kernels are
# short enough that every Python call around them (a helper, a second dtype lookup) shows.

def layer_norm_forward(x, weight, bias, eps):
    N, C = x.shape
    dtype = x.dtype
    acc = torch.float64 if dtype is torch.float64 else torch.float32
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()  # (held here until the kernel has run)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = torch.empty(N, C, dtype=dtype, device="cpu")
    mean = torch.empty(N, dtype=acc, device="cpu")
    rstd = torch.empty(N, dtype=acc, device="cpu")
    if N and C:
        _C.layer_norm_forward(_DTYPE_CODE[dtype], N, C, x.data_ptr(), x.stride(0),
                              0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                              y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), float(eps), threads())
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad):
    N, C = x.shape
    dtype = x.dtype
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    mean, rstd = _packed(mean), _packed(rstd)
    dx = torch.empty(N, C, dtype=dtype, device="cpu")
    alloc = torch.empty if N else torch.zeros  # with no rows the kernel does not run: the sums are 0
    dw = alloc(C, dtype=dtype, device="cpu") if need_weight_grad else None
    db = alloc(C, dtype=dtype, device="cpu") if need_bias_grad else None
    if N and C:
        _C.layer_norm_backward(_DTYPE_CODE[dtype], N, C, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0),
                               0 if weight is None else weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                               dx.data_ptr(), 0 if dw is None else dw.data_ptr(), 0 if db is None else db.data_ptr(),
                               threads())
    return dx, dw, db


def _rows(t):
    """t as rows of its last dimension, without a copy where its strides allow: (t or a packed copy,
    the number of rows, the row stride). The last dimension has unit stride (the callers see to it)."""
    C = t.shape[-1]
    if t.dim() == 2:
        return t, t.shape[0], t.stride(0)
    N = t.numel() // C if C else 0
    if t.dim() == 1:
        return t, 1, C
    # the leading dimensions must step evenly, each stride the next one's times its size
    shape, stride = t.shape, t.stride()
    for i in range(t.dim() - 2):
        if shape[i] > 1 and stride[i] != stride[i + 1] * shape[i + 1]:
            t = t.contiguous()
            return t, N, C
    return t, N, stride[-2]


def add_layer_norm_forward(x, residual, weight, bias, eps, out_dtype):
    """(h, y, mean, rstd) over the last dimension of x and residual (same shape, any leading
    dimensions); h and y come out contiguous, in x's shape."""
    if (x.dtype, residual.dtype, out_dtype) not in ADD_LAYER_NORM_DTYPES:
        return composed_add_layer_norm_forward(layer_norm_forward, x, residual, weight, bias, eps, out_dtype)
    C = x.shape[-1]
    x, N, x_stride = _rows(x)
    residual, _, r_stride = _rows(residual)
    weight, bias = _packed(weight), _packed(bias)
    h = torch.empty(x.shape, dtype=x.dtype, device="cpu")
    y = torch.empty(x.shape, dtype=out_dtype, device="cpu")
    mean = torch.empty(N, dtype=stats_dtype(x.dtype), device="cpu")
    rstd = torch.empty(N, dtype=stats_dtype(x.dtype), device="cpu")
    if x.numel():
        _C.add_layer_norm_forward(_DTYPE_CODE[x.dtype], _DTYPE_CODE[residual.dtype], _DTYPE_CODE[out_dtype], N, C,
                                  x.data_ptr(), x_stride, residual.data_ptr(), r_stride, _ptr(weight), _ptr(bias),
                                  h.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), float(eps), threads())
    return h, y, mean, rstd


def add_layer_norm_backward(dy, dh, h, weight, mean, rstd, residual_dtype, need_weight_grad, need_bias_grad):
    """(dx, dresidual, dw, db) in h's shape; dresidual is dx itself when the residual has h's dtype."""
    if (h.dtype, residual_dtype, dy.dtype) not in ADD_LAYER_NORM_DTYPES:
        return composed_add_layer_norm_backward(layer_norm_backward, dy, dh, h, weight, mean, rstd, residual_dtype,
                                                need_weight_grad, need_bias_grad)
    C = h.shape[-1]
    dy, N, dy_stride = _rows(dy)
    weight, mean, rstd, dh = _packed(weight), _packed(mean), _packed(rstd), _packed(dh)
    dx = torch.empty(h.shape, dtype=h.dtype, device="cpu")
    dres = dx if residual_dtype == h.dtype else torch.empty(h.shape, dtype=residual_dtype, device="cpu")
    alloc = torch.empty if N else torch.zeros
    dw = alloc(C, dtype=h.dtype, device="cpu") if need_weight_grad else None
    db = alloc(C, dtype=h.dtype, device="cpu") if need_bias_grad else None
    if h.numel():
        _C.add_layer_norm_backward(_DTYPE_CODE[h.dtype], _DTYPE_CODE[residual_dtype], _DTYPE_CODE[dy.dtype], N, C,
                                   dy.data_ptr(), dy_stride, _ptr(dh), h.data_ptr(), _ptr(weight), mean.data_ptr(),
                                   rstd.data_ptr(), dx.data_ptr(), 0 if dres is dx else dres.data_ptr(), _ptr(dw),
                                   _ptr(db), threads())
    return dx, dres, dw, db


def rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype):
    """(h, y, rstd) over the last dimension of x (and of residual, of x's shape), any leading dimensions:
    h = x + residual in x's dtype (empty without a residual), y its RMSNorm in out_dtype (x's dtype
    without a residual); h and y contiguous in x's shape."""
    if residual is not None and (x.dtype, residual.dtype, out_dtype) not in ADD_RMS_NORM_DTYPES:
        return composed_add_rms_norm_forward(rms_norm_forward, x, residual, weight, eps, weight_offset,
                                             cast_before_weight, out_dtype)
    C = x.shape[-1]
    x, N, x_stride = _rows(x)
    weight = _packed(weight)
    h = torch.empty(x.shape if residual is not None else (0,), dtype=x.dtype, device="cpu")
    y = torch.empty(x.shape, dtype=out_dtype, device="cpu")
    rstd = torch.empty(N, dtype=stats_dtype(x.dtype), device="cpu")
    if residual is not None:
        residual, _, r_stride = _rows(residual)
    if x.numel():
        code = _DTYPE_CODE[x.dtype]
        _C.rms_norm_forward(code, code if residual is None else _DTYPE_CODE[residual.dtype], _DTYPE_CODE[out_dtype],
                            N, C, x.data_ptr(), x_stride, _ptr(residual), 0 if residual is None else r_stride,
                            _ptr(weight), h.data_ptr(), y.data_ptr(), rstd.data_ptr(), float(eps),
                            float(weight_offset), bool(cast_before_weight), threads())
    return h, y, rstd


def rms_norm_backward(dy, dh, x, weight, rstd, weight_offset, cast_before_weight, residual_dtype, need_weight_grad):
    """(dx, dresidual, dweight) in x's shape (x: the forward's h where it had a residual, whose dtype is
    residual_dtype, else None); dresidual is empty without a residual or where it would equal dx (a
    residual of x's dtype), dweight where not needed."""
    if residual_dtype is not None and (x.dtype, residual_dtype, dy.dtype) not in ADD_RMS_NORM_DTYPES:
        return composed_add_rms_norm_backward(rms_norm_backward, dy, dh, x, weight, rstd, weight_offset,
                                              cast_before_weight, residual_dtype, need_weight_grad)
    C = x.shape[-1]
    x, N, x_stride = _rows(x)
    dy, _, dy_stride = _rows(dy)
    weight, rstd, dh = _packed(weight), _packed(rstd), _packed(dh)
    dx = torch.empty(x.shape, dtype=x.dtype, device="cpu")
    separate = residual_dtype is not None and residual_dtype != x.dtype
    dres = torch.empty(x.shape, dtype=residual_dtype, device="cpu") if separate else x.new_empty((0,))
    need_weight_grad = need_weight_grad and weight is not None
    dw = (torch.empty if N else torch.zeros)(C if need_weight_grad else 0, dtype=x.dtype, device="cpu")
    if x.numel():
        code = _DTYPE_CODE[x.dtype]
        _C.rms_norm_backward(code, _DTYPE_CODE[residual_dtype] if separate else code, _DTYPE_CODE[dy.dtype], N, C,
                             dy.data_ptr(), dy_stride, _ptr(dh), x.data_ptr(), x_stride, _ptr(weight),
                             rstd.data_ptr(), dx.data_ptr(), dres.data_ptr() if separate else 0,
                             dw.data_ptr() if need_weight_grad else 0, float(weight_offset), bool(cast_before_weight),
                             threads())
    return dx, dres, dw


def _mask_args(attn_mask, B, NH, TQ, TK):
    """The C++ kernels' mask arguments: pointer (0: none), dtype code, (B, NH, TQ, TK) strides."""
    if attn_mask is None:
        return 0, 0, (0, 0, 0, 0)
    code = _MASK_CODE[attn_mask.dtype]
    return attn_mask.data_ptr(), code, mask_strides(attn_mask, B, NH, TQ, TK)


def _torch_attention(q, k, v, dropout_p, attn_mask, window):
    """Whether this call goes to torch's flash attention (torch_runs): the plain cases only."""
    return not dropout_p and attn_mask is None and not window and k.shape[1] == q.shape[1] and \
        v.shape[3] == q.shape[3] and q.numel() > 0 and k.shape[2] > 0 and torch_runs("attention", q.dtype)


def attention_forward(q, k, v, is_causal, scale, dropout_p, seed, attn_mask=None, window=0):
    B, NH, TQ, HS = q.shape
    NKV, TK, HSV = k.shape[1], k.shape[2], v.shape[3]
    out = empty_bthd(B, NH, TQ, HSV, q)
    if _torch_attention(q, k, v, dropout_p, attn_mask, window):
        found, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, bool(is_causal),
                                                                                scale=float(scale))
        return out.copy_(found), lse  # (in the layout the fake kernels give: torch's varies)
    lse = torch.empty(B, NH, TQ, dtype=stats_dtype(q.dtype), device="cpu")
    if out.numel() and TK == 0:  # softmax over no keys: torch returns zeros
        out.zero_()
        lse.fill_(float("-inf"))
    elif out.numel():
        _C.attention_forward(_DTYPE_CODE[q.dtype], B, NH, NKV, TQ, TK, HS, HSV, q.data_ptr(), _strides3(q),
                             k.data_ptr(), _strides3(k), v.data_ptr(), _strides3(v), out.data_ptr(), _strides3(out),
                             lse.data_ptr(), *_mask_args(attn_mask, B, NH, TQ, TK), int(window), float(scale),
                             bool(is_causal), float(dropout_p), seed_value(seed), threads())
    return out, lse


def attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed, attn_mask=None, window=0,
                       grads=None):
    """(dq, dk, dv). `grads` (this backend only) may name three tensors of q's, k's and v's shapes and dtype, any strides
    with a unit last one, for the kernel to write into (nanofast.fused_block passes views of one
    (B, T, 3C) buffer, so the gradient of the qkv matmul's output needs no concatenation)."""
    if _torch_attention(q, k, v, dropout_p, attn_mask, window):
        found = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, bool(is_causal), scale=float(scale))
        return found if grads is None else tuple(g.copy_(f) for g, f in zip(grads, found))
    B, NH, TQ, HS = q.shape
    lse = _packed(lse)
    NKV, TK, HSV = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = grads if grads is not None else (empty_grad_like(q), empty_grad_like(k), empty_grad_like(v))
    if B * NH * TQ * TK == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _C.attention_backward(_DTYPE_CODE[q.dtype], B, NH, NKV, TQ, TK, HS, HSV, q.data_ptr(), _strides3(q), k.data_ptr(),
                          _strides3(k), v.data_ptr(), _strides3(v), out.data_ptr(), _strides3(out), dout.data_ptr(),
                          _strides3(dout), lse.data_ptr(), dq.data_ptr(), _strides3(dq), dk.data_ptr(), _strides3(dk),
                          dv.data_ptr(), _strides3(dv), *_mask_args(attn_mask, B, NH, TQ, TK), int(window),
                          float(scale), bool(is_causal), float(dropout_p), seed_value(seed), threads())
    return dq, dk, dv


def _gelu(x, dy, approximate):
    """gelu(x), or dy * gelu'(x) when dy is given."""
    if torch_runs("gelu", x.dtype):
        return torch.ops.aten.gelu(x, approximate=approximate) if dy is None else \
            torch.ops.aten.gelu_backward(dy, x, approximate=approximate)
    x, dy = _packed(x), _packed(dy)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel():
        _C.gelu(_DTYPE_CODE[x.dtype], x.numel(), x.data_ptr(), _ptr(dy), out.data_ptr(), threads(),
                tanh=approximate == "tanh")
    return out


def gelu_forward(x, approximate="none"):
    return _gelu(x, None, approximate)


def gelu_backward(dy, x, approximate="none"):
    """dy * gelu'(x)."""
    return _gelu(x, dy, approximate)


def gelu_forward_saving_grad(x):
    """(gelu(x), gelu'(x)): the derivative in the accumulation dtype (float32 for bfloat16), for
    gelu_backward_from_grad (this backend only: nanofast.fused_block keeps the derivative)."""
    x = _packed(x)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad = torch.empty(x.shape, dtype=stats_dtype(x.dtype), device="cpu")
    if x.numel():
        _C.gelu(_DTYPE_CODE[x.dtype], x.numel(), x.data_ptr(), 0, out.data_ptr(), threads(), grad.data_ptr())
    return out, grad


def gelu_backward_from_grad(dy, grad):
    """dy * gelu'(x) from the derivative gelu_forward_saving_grad kept: the bits of gelu_backward(dy, x),
    without the erf and exp."""
    dy = _packed(dy)
    out = torch.empty_like(dy, memory_format=torch.contiguous_format)
    if dy.numel():
        _C.gelu(_DTYPE_CODE[dy.dtype], dy.numel(), 0, dy.data_ptr(), out.data_ptr(), threads(), grad.data_ptr())
    return out


_ACTIVATION_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def glu_forward(gate, up, activation):
    """act(gate) * up over the last dimension (unit stride) of gate and up (one shape, any leading
    dimensions), contiguous in gate's shape."""
    C = gate.shape[-1]
    gate, N, g_stride = _rows(gate)
    up, _, u_stride = _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device="cpu")
    if out.numel():
        _C.glu(_DTYPE_CODE[gate.dtype], _ACTIVATION_CODE[activation], N, C, gate.data_ptr(), g_stride, up.data_ptr(),
               u_stride, 0, out.data_ptr(), 0, 0, threads())
    return out


def glu_backward(dy, gate, up, activation):
    """(dgate, dup) = (dy * up * act'(gate), dy * act(gate)), contiguous in gate's shape."""
    C = gate.shape[-1]
    gate, N, g_stride = _rows(gate)
    up, _, u_stride = _rows(up)
    dy = dy.contiguous()
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device="cpu")
    dup = torch.empty(gate.shape, dtype=gate.dtype, device="cpu")
    if dy.numel():
        _C.glu(_DTYPE_CODE[gate.dtype], _ACTIVATION_CODE[activation], N, C, gate.data_ptr(), g_stride, up.data_ptr(),
               u_stride, dy.data_ptr(), 0, dgate.data_ptr(), dup.data_ptr(), threads())
    return dgate, dup


def _as_4d(t):
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))  # a view: leading dims of 1


def _rotary(q, k, cos, sin, interleaved, backward, out_dtype):
    """The rotation (or with backward its transpose) of q and k, either of which may be None (an empty
    (0,) result). cos and sin broadcast over the leading dims of each (as nanofast.ops.checks.rotary_args
    says); the results are laid out as their inputs where those are dense (empty_rows_like)."""
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    R = cos.shape[-1]
    cos4 = _as_4d(cos)
    outs, args = [], []
    for t in (q, k):
        if t is None or t.numel() == 0:
            outs.append(cos.new_empty((0,), dtype=out_dtype) if t is None else torch.empty_like(t, dtype=out_dtype))
            args += [(0, 0, 0), 0, (0, 0, 0), 0, (0, 0, 0), (0, 0, 0)]
            continue
        t4 = _as_4d(t)
        out = empty_rows_like(t, out_dtype)
        outs.append(out)
        c4 = cos4.expand(*t4.shape[:3], R)
        args += [tuple(t4.shape[:3]), t4.data_ptr(), _strides3(t4), out.data_ptr(), _strides3(_as_4d(out)),
                 _strides3(c4)]
    src = q if q is not None else k
    if not _C.rope(_DTYPE_CODE[src.dtype], _DTYPE_CODE[cos.dtype], _DTYPE_CODE[out_dtype], src.shape[-1], R,
                   cos.data_ptr(), sin.data_ptr(), *args, bool(interleaved), backward, threads()):
        raise TypeError(f"rotary embedding: no kernel for {src.dtype} rows with {cos.dtype} cos and sin")
    return outs[0], outs[1]


def rotary_forward(q, k, cos, sin, interleaved):
    """(q * cos + rotate(q) * sin, the same for k) over the first cos.shape[-1] columns, the others
    copied, in the dtype q's and cos's promote to."""
    return _rotary(q, k, cos, sin, interleaved, False, torch.promote_types(q.dtype, cos.dtype))


def rotary_backward(dq, dk, cos, sin, interleaved, dtype):
    """The inputs' gradients in dtype (q's): the transposed rotation of dq and dk (either may be None)."""
    return _rotary(dq, dk, cos, sin, interleaved, True, dtype)


# Below about 2M multiply-adds (or 4 rows) packing the operands and starting threads cost more than
# torch's whole call: torch's matmul takes those (a few rows against a weight: the matrix-vector kernel).
GEMM_MIN_MACS = 1 << 21
GEMM_MIN_ROWS = 4


def uses_gemm(M, N, K, dtype):
    """Whether mm runs nanofast's GEMM for an (M, K) @ (K, N) product computed in this dtype: float32
    where the CPU has AVX-512, bfloat16 where it has AVX512-BF16 (and, for both, it is not Intel's)."""
    if M < GEMM_MIN_ROWS or M * N * K < GEMM_MIN_MACS:
        return False
    return _C.has_gemm() if dtype is torch.float32 else dtype is torch.bfloat16 and _C.has_gemm_bf16()


_GEMM_BF16_OPERANDS = (torch.float32, torch.bfloat16)

# Up to this many rows (sequences sampled at once) a product against a weight of at least
# GEMV_MIN_WEIGHTS elements runs nanofast's matrix-vector kernel (csrc/gemv.h), which reads each weight
# row once for all of them, where the GEMMs would pack the weight first. Below that size the call around
# the kernel costs as much as torch's whole product.
GEMV_MAX_ROWS = 8
GEMV_MIN_WEIGHTS = 1 << 15


def uses_gemv(M, N, K, dtype):
    """Whether an (M, K) @ W^T product with W (N, K) computed in dtype runs nanofast's matrix-vector
    kernel (where W's rows are contiguous): a few rows, a weight of some size, float32 or bfloat16
    products, on every CPU but Intel's (whose torch has MKL's own AVX-512 code) unless NANOFAST_GEMM says
    otherwise."""
    return 0 < M <= GEMV_MAX_ROWS and N * K >= GEMV_MIN_WEIGHTS and \
        (dtype is torch.float32 or dtype is torch.bfloat16) and _C.has_gemv()


def _gemv(a, b, bias, dtype, out_dtype):
    """mm's product by csrc/gemv.h where it applies (b is W^T: b.stride(0) == 1), else None."""
    if b.stride(0) != 1 or not uses_gemv(a.shape[0], b.shape[1], a.shape[1], dtype):
        return None
    if dtype is torch.float32:
        if not (a.dtype is b.dtype is out_dtype is dtype and (bias is None or bias.dtype is dtype)):
            return None
    elif not (a.dtype in _GEMM_BF16_OPERANDS and b.dtype in _GEMM_BF16_OPERANDS and out_dtype in _GEMM_BF16_OPERANDS
              and (bias is None or bias.dtype in _GEMM_BF16_OPERANDS)):
        return None
    (M, K), N = a.shape, b.shape[1]
    if a.stride(1) != 1:
        a = a.contiguous()
    bias = _packed(bias)
    out = torch.empty(M, N, dtype=out_dtype, device="cpu")
    _C.gemv(M, N, K, a.data_ptr(), a.stride(0), _DTYPE_CODE[a.dtype], b.data_ptr(), b.stride(1), _DTYPE_CODE[b.dtype],
            _ptr(bias), 0 if bias is None else _DTYPE_CODE[bias.dtype], out.data_ptr(), N, _DTYPE_CODE[out_dtype],
            dtype is torch.bfloat16, threads())
    return out


def has_gemm_bf16():
    """Whether bfloat16 products can run nanofast's bfloat16 GEMM (AVX512-BF16, not Intel's CPU)."""
    return _C.has_gemm_bf16()


def mm(a, b, bias=None, dtype=None, out_dtype=None, out=None, accumulate=False):
    """a @ b (+ bias) for 2-D tensors, any strides, with the products in `dtype` (default: a's) and the
    result in `out_dtype` (default: dtype).

    float32 products run nanofast's float32 GEMM where uses_gemm says so (torch's float32 matmul runs
    its AVX2 code on AMD CPUs). bfloat16 products take float32 or bfloat16 operands and bias, each
    rounded to bfloat16 as autocast's casts would, and sum in float32: nanofast's bfloat16 GEMM rounds
    while packing (no cast copies) and can return the float32 sums unrounded (out_dtype=float32, for
    weight gradients). Elsewhere torch's matmul runs on the cast operands. The GEMMs' results are
    contiguous, and their bits depend neither on a's or b's strides nor on the number of threads.

    A few rows against a weight (b = W^T, uses_gemv) run nanofast's matrix-vector kernel instead, in
    either dtype.

    out: an (M, N) tensor with a unit column stride to write the result into (its dtype is the
    result's), returned; accumulate: out += a @ b instead (bias ignored)."""
    (M, K), N = a.shape, b.shape[1]
    dtype = dtype or a.dtype
    if M <= GEMV_MAX_ROWS and out is None and not accumulate:
        few_rows = _gemv(a, b, bias, dtype, out_dtype or dtype)
        if few_rows is not None:
            return few_rows
    if out is not None:
        out_dtype = out.dtype
    gemm_out = out is None or out.stride(1) == 1 or N == 1
    if dtype is torch.float32 and b.dtype is a.dtype is dtype and out_dtype in (None, dtype) and gemm_out and \
            uses_gemm(M, N, K, dtype):
        out = torch.empty(M, N, dtype=torch.float32, device="cpu") if out is None else out
        bias = _packed(bias)
        (a_rs, a_cs), (b_rs, b_cs) = a.stride(), b.stride()
        _C.gemm(M, N, K, a.data_ptr(), a_rs, a_cs, b.data_ptr(), b_rs, b_cs, out.data_ptr(), out.stride(0),
                _ptr(bias), accumulate, threads())
        return out
    out_dtype = out_dtype or dtype
    if dtype is torch.bfloat16 and a.dtype in _GEMM_BF16_OPERANDS and b.dtype in _GEMM_BF16_OPERANDS and \
            out_dtype in _GEMM_BF16_OPERANDS and (bias is None or bias.dtype in _GEMM_BF16_OPERANDS) and gemm_out and \
            not (accumulate and out_dtype is not torch.float32) and uses_gemm(M, N, K, dtype):
        out = torch.empty(M, N, dtype=out_dtype, device="cpu") if out is None else out
        bias = _packed(bias)
        (a_rs, a_cs), (b_rs, b_cs) = a.stride(), b.stride()
        _C.gemm_bf16(M, N, K, a.data_ptr(), a_rs, a_cs, _DTYPE_CODE[a.dtype], b.data_ptr(), b_rs, b_cs,
                     _DTYPE_CODE[b.dtype], out.data_ptr(), out.stride(0), _DTYPE_CODE[out_dtype], _ptr(bias),
                     0 if bias is None else _DTYPE_CODE[bias.dtype], accumulate, threads())
        return out
    a, b = a.to(dtype), b.to(dtype)
    if accumulate and out.dtype is dtype:
        return out.addmm_(a, b)
    result = torch.mm(a, b) if bias is None or accumulate else torch.addmm(bias.to(dtype), a, b)
    if out is None:
        return result.to(out_dtype)
    return out.add_(result) if accumulate else out.copy_(result)


def linear(x, weight, bias=None, dtype=None):
    """x @ weight.T (+ bias) on (N, in) rows, the products in dtype (default x's): nn.Linear's product."""
    return mm(x, weight.t(), bias, dtype)


def linear_backward(dy, x, weight, need_input_grad, need_weight_grad, need_bias_grad, dtype=None):
    """(dx, dweight, dbias) of linear for the (N, out) gradient dy, products in dtype as in the forward;
    None where not needed. dx comes in dtype (autocast's), dweight and dbias in the parameters' own
    dtypes: a bfloat16 product's weight gradient is its float32 sums, never rounded to bfloat16."""
    dx = mm(dy, weight, dtype=dtype) if need_input_grad else None
    dw = mm(dy.t(), x, dtype=dtype, out_dtype=weight.dtype) if need_weight_grad else None
    db = dy.sum(0) if need_bias_grad else None
    return dx, dw, db


def dropout(x, p, seed):
    """x with each element kept (scaled by 1 / (1 - p)) or zeroed as the generator decides for its
    offset under seed; applied to a gradient with the same seed, it is the backward."""
    x = _packed(x)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel():
        _C.dropout(_DTYPE_CODE[x.dtype], x.numel(), x.data_ptr(), out.data_ptr(), seed_value(seed), float(p),
                   threads())
    return out


def dropout_mask(seed, batch, heads, q_len, k_len, p):
    out = torch.empty(batch, heads, q_len, k_len, dtype=torch.uint8, device="cpu")
    if out.numel():
        _C.dropout_mask(int(seed), batch, heads, q_len, k_len, float(p), out.data_ptr(), threads())
    return out.view(torch.bool)


def cross_entropy_rows(logits, target, ignore_index, label_smoothing, grad_scale, row_scale, grad, loss):
    """The row pass of linear_cross_entropy (chunked_cross_entropy's `rows`) in one C++ sweep per row;
    with logits None, the targets' check and count alone."""
    N = target.shape[0]
    if N == 0:
        return 0.0, 0, -1
    dtype, V, ld = (0, 0, 0) if logits is None else (_DTYPE_CODE[logits.dtype], logits.shape[1], logits.stride(0))
    return _C.cross_entropy_rows(dtype, N, V, _ptr(logits), ld, target.data_ptr(), int(ignore_index),
                                 float(label_smoothing), float(grad_scale), _ptr(row_scale), bool(grad), _ptr(loss),
                                 threads())


def multinomial_from_uniform(probs, u):
    """(B, 1) int64: torch.multinomial(probs, 1)'s draws from the float64 uniforms u (B, V) its exponentials
    are made from, for (B, V) float32 probs with a unit last stride; None where torch would refuse a row
    (an entry negative, NaN or infinite, or a row of zeros)."""
    B, V = probs.shape
    out = torch.empty(B, 1, dtype=torch.long, device="cpu")
    refused = _C.multinomial_from_uniform(B, V, probs.data_ptr(), probs.stride(0), u.data_ptr(), out.data_ptr())
    return None if refused else out


def _gemm_operand(weight, dtype):
    return weight  # mm rounds float32 operands to bfloat16 itself (while packing, or through torch's casts)


_chunk_pieces = (mm, cross_entropy_rows, _gemm_operand)
linear_cross_entropy_forward = functools.partial(chunked_cross_entropy.forward, *_chunk_pieces)
linear_cross_entropy_backward = functools.partial(chunked_cross_entropy.backward, *_chunk_pieces)
