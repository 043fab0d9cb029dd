"""The CPU backend: launchers of the C++/OpenMP kernels (nanofast._C), as backend.py describes them.

Tensors in, raw pointers, sizes and strides out: this layer allocates the outputs and translates
tensors into the pointer-and-stride form the C++ side takes. Arguments are checked by the callers
(checks.py), against the capabilities written here.
"""
import functools

import torch

from .. import _C
from .._layout import empty_bthd, empty_grad_like
from . import chunked_cross_entropy
from .compose import composed_add_layer_norm_backward, composed_add_layer_norm_forward
from .seed import seed_value

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}

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


def _threads():
    return torch.get_num_threads()


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
    y = torch.empty(N, C, dtype=dtype)
    mean = torch.empty(N, dtype=acc)
    rstd = torch.empty(N, dtype=acc)
    if N and C:
        _C.layer_norm_forward(_DTYPE_CODE[dtype], N, C, x.data_ptr(), x.stride(0),
                              0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                              y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), float(eps), torch.get_num_threads())
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad):
    N, C = x.shape
    dtype = x.dtype
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    mean, rstd = _packed(mean), _packed(rstd)
    dx = torch.empty(N, C, dtype=dtype)
    alloc = torch.empty if N else torch.zeros  # with no rows the kernel does not run: the sums are 0
    dw = alloc(C, dtype=dtype) if need_weight_grad else None
    db = alloc(C, dtype=dtype) if need_bias_grad else None
    if N and C:
        _C.layer_norm_backward(_DTYPE_CODE[dtype], N, C, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0),
                               0 if weight is None else weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                               dx.data_ptr(), 0 if dw is None else dw.data_ptr(), 0 if db is None else db.data_ptr(),
                               torch.get_num_threads())
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
    h = torch.empty(x.shape, dtype=x.dtype)
    y = torch.empty(x.shape, dtype=out_dtype)
    mean = torch.empty(N, dtype=stats_dtype(x.dtype))
    rstd = torch.empty(N, dtype=stats_dtype(x.dtype))
    if x.numel():
        _C.add_layer_norm_forward(_DTYPE_CODE[x.dtype], _DTYPE_CODE[residual.dtype], _DTYPE_CODE[out_dtype], N, C,
                                  x.data_ptr(), x_stride, residual.data_ptr(), r_stride, _ptr(weight), _ptr(bias),
                                  h.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), float(eps), _threads())
    return h, y, mean, rstd


def add_layer_norm_backward(dy, dh, h, weight, mean, rstd, residual_dtype, need_weight_grad, need_bias_grad):
    """(dx, dresidual, dw, db) in h's shape; dresidual is dx itself when the residual has h's dtype."""
    if (h.dtype, residual_dtype, dy.dtype) not in ADD_LAYER_NORM_DTYPES:
        return composed_add_layer_norm_backward(layer_norm_backward, dy, dh, h, weight, mean, rstd, residual_dtype,
                                                need_weight_grad, need_bias_grad)
    C = h.shape[-1]
    dy, N, dy_stride = _rows(dy)
    weight, mean, rstd, dh = _packed(weight), _packed(mean), _packed(rstd), _packed(dh)
    dx = torch.empty(h.shape, dtype=h.dtype)
    dres = dx if residual_dtype == h.dtype else torch.empty(h.shape, dtype=residual_dtype)
    alloc = torch.empty if N else torch.zeros
    dw = alloc(C, dtype=h.dtype) if need_weight_grad else None
    db = alloc(C, dtype=h.dtype) if need_bias_grad else None
    if h.numel():
        _C.add_layer_norm_backward(_DTYPE_CODE[h.dtype], _DTYPE_CODE[residual_dtype], _DTYPE_CODE[dy.dtype], N, C,
                                   dy.data_ptr(), dy_stride, _ptr(dh), h.data_ptr(), _ptr(weight), mean.data_ptr(),
                                   rstd.data_ptr(), dx.data_ptr(), 0 if dres is dx else dres.data_ptr(), _ptr(dw),
                                   _ptr(db), _threads())
    return dx, dres, dw, db


def attention_forward(q, k, v, is_causal, scale, dropout_p, seed):
    B, NH, TQ, HS = q.shape
    TK, HSV = k.shape[2], v.shape[3]
    out = empty_bthd(B, NH, TQ, HSV, q)
    lse = torch.empty(B, NH, TQ, dtype=stats_dtype(q.dtype))
    if out.numel() and TK == 0:  # softmax over no keys: torch returns zeros
        out.zero_()
        lse.fill_(float("-inf"))
    elif out.numel():
        _C.attention_forward(_DTYPE_CODE[q.dtype], B, NH, TQ, TK, HS, HSV, q.data_ptr(), _strides3(q),
                             k.data_ptr(), _strides3(k), v.data_ptr(), _strides3(v), out.data_ptr(), _strides3(out),
                             lse.data_ptr(), float(scale), bool(is_causal), float(dropout_p), seed_value(seed), _threads())
    return out, lse


def attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed, grads=None):
    """(dq, dk, dv). `grads` (this backend only) may name three tensors of q's, k's and v's shapes and dtype, any strides
    with a unit last one, for the kernel to write into (nanofast.fused_block passes views of one
    (B, T, 3C) buffer, so the gradient of the qkv matmul's output needs no concatenation)."""
    B, NH, TQ, HS = q.shape
    lse = _packed(lse)
    TK, HSV = k.shape[2], v.shape[3]
    dq, dk, dv = grads if grads is not None else (empty_grad_like(q), empty_grad_like(k), empty_grad_like(v))
    if B * NH * TQ * TK == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _C.attention_backward(_DTYPE_CODE[q.dtype], B, NH, TQ, TK, HS, HSV, q.data_ptr(), _strides3(q), k.data_ptr(),
                          _strides3(k), v.data_ptr(), _strides3(v), out.data_ptr(), _strides3(out), dout.data_ptr(),
                          _strides3(dout), lse.data_ptr(), dq.data_ptr(), _strides3(dq), dk.data_ptr(), _strides3(dk),
                          dv.data_ptr(), _strides3(dv), float(scale), bool(is_causal), float(dropout_p),
                          seed_value(seed), _threads())
    return dq, dk, dv


def _gelu(x, dy):
    """gelu(x), or dy * gelu'(x) when dy is given."""
    x, dy = _packed(x), _packed(dy)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel():
        _C.gelu(_DTYPE_CODE[x.dtype], x.numel(), x.data_ptr(), _ptr(dy), out.data_ptr(), _threads())
    return out


def gelu_forward(x):
    return _gelu(x, None)


def gelu_backward(dy, x):
    """dy * gelu'(x)."""
    return _gelu(x, dy)


def gelu_forward_saving_grad(x):
    """(gelu(x), gelu'(x)): the derivative in the accumulation dtype (float32 for bfloat16), for
    gelu_backward_from_grad (this backend only: nanofast.fused_block keeps the derivative)."""
    x = _packed(x)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad = torch.empty(x.shape, dtype=stats_dtype(x.dtype))
    if x.numel():
        _C.gelu(_DTYPE_CODE[x.dtype], x.numel(), x.data_ptr(), 0, out.data_ptr(), _threads(), grad.data_ptr())
    return out, grad


def gelu_backward_from_grad(dy, grad):
    """dy * gelu'(x) from the derivative gelu_forward_saving_grad kept: the bits of gelu_backward(dy, x),
    without the erf and exp."""
    dy = _packed(dy)
    out = torch.empty_like(dy, memory_format=torch.contiguous_format)
    if dy.numel():
        _C.gelu(_DTYPE_CODE[dy.dtype], dy.numel(), 0, dy.data_ptr(), out.data_ptr(), _threads(), grad.data_ptr())
    return out


# Below about 2M multiply-adds (or 4 rows) packing the operands and starting threads cost more than
# torch's whole call (a matrix-vector product while sampling, say): torch's matmul takes those.
GEMM_MIN_MACS = 1 << 21
GEMM_MIN_ROWS = 4


def uses_gemm(M, N, K, dtype):
    """Whether mm runs nanofast's GEMM for an (M, K) @ (K, N) product computed in this dtype: float32
    where the CPU has AVX-512, bfloat16 where it has AVX512-BF16 (and, for both, it is not Intel's)."""
    if M < GEMM_MIN_ROWS or M * N * K < GEMM_MIN_MACS:
        return False
    return _C.has_gemm() if dtype is torch.float32 else dtype is torch.bfloat16 and _C.has_gemm_bf16()


_GEMM_BF16_OPERANDS = (torch.float32, torch.bfloat16)


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

    out: an (M, N) tensor with a unit column stride to write the result into (its dtype is the
    result's), returned; accumulate: out += a @ b instead (bias ignored)."""
    (M, K), N = a.shape, b.shape[1]
    dtype = dtype or a.dtype
    if out is not None:
        out_dtype = out.dtype
    gemm_out = out is None or out.stride(1) == 1 or N == 1
    if dtype is torch.float32 and b.dtype is a.dtype is dtype and out_dtype in (None, dtype) and gemm_out and \
            uses_gemm(M, N, K, dtype):
        out = torch.empty(M, N, dtype=torch.float32) if out is None else out
        bias = _packed(bias)
        (a_rs, a_cs), (b_rs, b_cs) = a.stride(), b.stride()
        _C.gemm(M, N, K, a.data_ptr(), a_rs, a_cs, b.data_ptr(), b_rs, b_cs, out.data_ptr(), out.stride(0),
                _ptr(bias), accumulate, _threads())
        return out
    out_dtype = out_dtype or dtype
    if dtype is torch.bfloat16 and a.dtype in _GEMM_BF16_OPERANDS and b.dtype in _GEMM_BF16_OPERANDS and \
            out_dtype in _GEMM_BF16_OPERANDS and (bias is None or bias.dtype in _GEMM_BF16_OPERANDS) and gemm_out and \
            not (accumulate and out_dtype is not torch.float32) and uses_gemm(M, N, K, dtype):
        out = torch.empty(M, N, dtype=out_dtype) if out is None else out
        bias = _packed(bias)
        (a_rs, a_cs), (b_rs, b_cs) = a.stride(), b.stride()
        _C.gemm_bf16(M, N, K, a.data_ptr(), a_rs, a_cs, _DTYPE_CODE[a.dtype], b.data_ptr(), b_rs, b_cs,
                     _DTYPE_CODE[b.dtype], out.data_ptr(), out.stride(0), _DTYPE_CODE[out_dtype], _ptr(bias),
                     0 if bias is None else _DTYPE_CODE[bias.dtype], accumulate, _threads())
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
                   _threads())
    return out


def dropout_mask(seed, batch, heads, q_len, k_len, p):
    out = torch.empty(batch, heads, q_len, k_len, dtype=torch.uint8)
    if out.numel():
        _C.dropout_mask(int(seed), batch, heads, q_len, k_len, float(p), out.data_ptr(), _threads())
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
                                 _threads())


def _gemm_operand(weight, dtype):
    return weight  # mm rounds float32 operands to bfloat16 itself (while packing, or through torch's casts)


_chunk_pieces = (mm, cross_entropy_rows, _gemm_operand)
linear_cross_entropy_forward = functools.partial(chunked_cross_entropy.forward, *_chunk_pieces)
linear_cross_entropy_backward = functools.partial(chunked_cross_entropy.backward, *_chunk_pieces)
