"""nanofast::add_layer_norm_fwd / add_layer_norm_bwd — the residual add fused with the LayerNorm after
it — and the user-facing `add_layer_norm`.

A pre-norm transformer block computes x = x + f(layer_norm(x)) twice; written as

    x, h = add_layer_norm(x, f_out, (C,), weight, bias)     # x + f_out, and its LayerNorm

the add, the norm and, in the backward, the sum of the two gradients that reach x take one pass over
the rows instead of three. Under bfloat16 autocast, f_out is bf16 while the stream x stays float32:
the kernel reads the two dtypes as they are, and `out_dtype=torch.bfloat16` writes the normalised rows
in the dtype the next matmul casts them to anyway.

CPU tensors run the fused C++ kernel (csrc/add_layer_norm.h) for float32 rows with a float32 or
bfloat16 residual and output, and for all-bfloat16 or all-float64 rows. Other combinations, and CUDA
tensors, compose torch's add with nanofast's LayerNorm kernels: the same results, unfused.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._launch import launchers
from ._validate import add_layer_norm_args, unit_last_stride


def _fused(launch, x_dtype, residual_dtype, y_dtype):
    return (x_dtype, residual_dtype, y_dtype) in getattr(launch, "ADD_LAYER_NORM_DTYPES", ())


def _forward(launch, x, residual, weight, bias, eps, out_dtype):
    """(h, y, mean, rstd) over the last dimension (unit stride) of x and residual, any leading dims."""
    if _fused(launch, x.dtype, residual.dtype, out_dtype):
        return launch.add_layer_norm_forward(x, residual, weight, bias, eps, out_dtype)
    # residual's dtype never promotes x's (checked), so h has x's dtype; contiguous, because the add
    # follows the inputs' strides and the rows below are a view of it
    h = (x + residual).contiguous()
    y, mean, rstd = launch.layer_norm_forward(h.view(-1, h.shape[-1]), weight, bias, eps)
    return h, y.view(h.shape).to(out_dtype), mean, rstd


def _backward(launch, dy, dh, h, weight, mean, rstd, residual_dtype, need_w, need_b):
    """(dx, dresidual, dweight or None, dbias or None) in h's shape; dresidual may be dx itself."""
    dy = unit_last_stride(dy)
    if _fused(launch, h.dtype, residual_dtype, dy.dtype):
        return launch.add_layer_norm_backward(dy, dh, h, weight, mean, rstd, residual_dtype, need_w, need_b)
    C = h.shape[-1]
    dx, dw, db = launch.layer_norm_backward(dy.to(h.dtype).reshape(-1, C).contiguous(), h.view(-1, C), weight, mean,
                                            rstd, need_w, need_b)
    dx = dx.view(h.shape)
    if dh is not None:
        dx = dx + dh
    return dx, dx.to(residual_dtype), dw, db


@torch.library.custom_op("nanofast::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(launchers(x), x, residual, weight, bias, eps, out_dtype)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    N = x.shape[0]
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype), x.new_empty((N,), dtype=acc),
            x.new_empty((N,), dtype=acc))


@torch.library.custom_op("nanofast::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], mean: Tensor,
                       rstd: Tensor, residual_dtype: torch.dtype, need_weight_grad: bool,
                       need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dres, dw, db = _backward(launchers(h), dy, dh, h, weight, mean, rstd, residual_dtype, need_weight_grad,
                                 need_bias_grad)
    # Custom ops cannot return None or one tensor twice: what is not separate comes back empty.
    empty = lambda: h.new_empty((0,))  # noqa: E731
    return dx, empty() if dres is dx else dres, empty() if dw is None else dw, empty() if db is None else db


@add_layer_norm_bwd.register_fake
def _(dy, dh, h, weight, mean, rstd, residual_dtype, need_weight_grad, need_bias_grad):
    C = h.shape[1]
    dres = h.new_empty((0,)) if residual_dtype == h.dtype else h.new_empty(h.shape, dtype=residual_dtype)
    return (h.new_empty(h.shape), dres, h.new_empty((C if need_weight_grad else 0,)),
            h.new_empty((C if need_bias_grad else 0,)))


def _save(ctx, residual, weight, bias, h, mean, rstd):
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.residual_dtype = residual.dtype
    ctx.has_bias = bias is not None


def _wanted(ctx, weight):
    return weight is not None and ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]


def _setup_context(ctx, inputs, output):
    _, residual, weight, bias, _, _ = inputs
    h, _, mean, rstd = output
    _save(ctx, residual, weight, bias, h, mean, rstd)


def _op_backward(ctx, dh, dy, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    need_w, need_b = _wanted(ctx, weight)
    dx, dres, dw, db = add_layer_norm_bwd(dy, dh, h, weight, mean, rstd, ctx.residual_dtype, need_w, need_b)
    if ctx.residual_dtype == h.dtype:  # the residual's gradient is dx itself (returned empty)
        dres = dx
    return dx, dres, dw if need_w else None, db if need_b else None, None, None


add_layer_norm_fwd.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerAddLayerNorm(torch.autograd.Function):
    """The eager-mode path: the custom op's autograd formula without the op dispatch (see
    layer_norm.py). `launch` forces a set of launchers."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype, launch=None):
        ctx.set_materialize_grads(False)
        ctx.launch = launch or launchers(x)
        h, y, mean, rstd = _forward(ctx.launch, x, residual, weight, bias, eps, out_dtype)
        _save(ctx, residual, weight, bias, h, mean, rstd)
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # the normalised rows were not used: only the sum's gradient flows
            dx = torch.zeros_like(h) if dh is None else dh
            return dx, dx.to(ctx.residual_dtype), None, None, None, None, None
        need_w, need_b = _wanted(ctx, weight)
        dx, dres, dw, db = _backward(ctx.launch, dy, dh, h, weight, mean, rstd, ctx.residual_dtype, need_w, need_b)
        return dx, dres, dw, db, None, None, None


def add_layer_norm(input: Tensor, residual: Tensor, normalized_shape, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5,
                   out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """(input + residual, layer_norm(input + residual, normalized_shape, weight, bias, eps)), the sum in
    input's dtype (residual may be of input's dtype or a lower precision one: bfloat16 beside float32),
    the normalised tensor in out_dtype (default: input's dtype)."""
    normalized_shape, eps, out_dtype = add_layer_norm_args(input, residual, normalized_shape, weight, bias, eps,
                                                           out_dtype)
    if torch.compiler.is_compiling() or len(normalized_shape) > 1:
        # the custom op (what a compiled graph records) on a 2-D view of the rows
        C = math.prod(normalized_shape)
        x2d = unit_last_stride(unit_last_stride(input).reshape(-1, C))
        r2d = unit_last_stride(unit_last_stride(residual).reshape(-1, C))
        w = None if weight is None else weight.reshape(C)
        b = None if bias is None else bias.reshape(C)
        h, y = add_layer_norm_fwd(x2d, r2d, w, b, eps, out_dtype)[:2]
        return h.view(input.shape), y.view(input.shape)
    # eager: the tensors as they are (the kernels take any leading dimensions), so autograd records
    # no reshapes around the op
    return _EagerAddLayerNorm.apply(unit_last_stride(input), unit_last_stride(residual), weight, bias, eps,
                                    out_dtype)
