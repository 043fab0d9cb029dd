"""nanofast::add_layer_norm_fwd / add_layer_norm_bwd — the residual add fused with the LayerNorm after
it, as raw custom ops with fakes, one autograd formula for them, and the user-facing `add_layer_norm`.

A pre-norm transformer block computes x = x + f(layer_norm(x)) twice; written as

    x, h = add_layer_norm(x, f_out, (C,), weight, bias)     # x + f_out, and its LayerNorm

the add, the norm and, in the backward, the sum of the two gradients that reach x take one pass over
the rows instead of three. Under bfloat16 autocast, f_out is bf16 while the stream x stays float32:
the kernel reads the two dtypes as they are, and `out_dtype=torch.bfloat16` writes the normalised rows
in the dtype the next matmul casts them to anyway.

The backend runs the fused kernel for the dtype combinations it lists (backend.py,
ADD_LAYER_NORM_DTYPES) and composes torch's add with its LayerNorm kernels for the others (compose.py):
the same results, unfused. The formula is used as in layer_norm.py: the custom ops' autograd under
torch.compile, _EagerAddLayerNorm around the launchers in eager mode.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._layout import unit_last_stride
from . import cuda
from .backend import backend_for
from .checks import add_layer_norm_args
from .formula import differentiable_grads, eager_apply, register_formula, stand_in
from .layer_norm import layer_norm_reference


@torch.library.custom_op("nanofast::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend_for(x).add_layer_norm_forward(x, residual, weight, bias, eps, out_dtype)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    stats = backend_for(x).stats_dtype(x.dtype)
    N = x.shape[0]
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype), x.new_empty((N,), dtype=stats),
            x.new_empty((N,), dtype=stats))


@torch.library.custom_op("nanofast::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], mean: Tensor,
                       rstd: Tensor, residual_dtype: torch.dtype, need_weight_grad: bool,
                       need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _fixed_arity(h, *backend_for(h).add_layer_norm_backward(dy, dh, h, weight, mean, rstd, residual_dtype,
                                                                    need_weight_grad, need_bias_grad))


def _fixed_arity(h, dx, dres, dw, db):
    """Custom ops cannot return None or one tensor twice: what is not separate comes back empty."""
    empty = lambda: h.new_empty((0,))  # noqa: E731
    return dx, empty() if dres is dx else dres, empty() if dw is None else dw, empty() if db is None else db


@add_layer_norm_bwd.register_fake
def _(dy, dh, h, weight, mean, rstd, residual_dtype, need_weight_grad, need_bias_grad):
    C = h.shape[1]
    dres = h.new_empty((0,)) if residual_dtype == h.dtype else h.new_empty(h.shape, dtype=residual_dtype)
    return (h.new_empty(h.shape), dres, h.new_empty((C if need_weight_grad else 0,)),
            h.new_empty((C if need_bias_grad else 0,)))


# The CUDA twins for torch.compile (as in layer_norm.py): the composed add + LayerNorm, traced.

@torch.library.triton_op("nanofast::add_layer_norm_fwd_triton", mutates_args=())
def add_layer_norm_fwd_triton(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              eps: float, out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return cuda.add_layer_norm_forward(x, residual, weight, bias, eps, out_dtype, launch=torch.library.wrap_triton)


@torch.library.triton_op("nanofast::add_layer_norm_bwd_triton", mutates_args=())
def add_layer_norm_bwd_triton(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], mean: Tensor,
                              rstd: Tensor, residual_dtype: torch.dtype, need_weight_grad: bool,
                              need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _fixed_arity(h, *cuda.add_layer_norm_backward(dy, dh, h, weight, mean, rstd, residual_dtype,
                                                         need_weight_grad, need_bias_grad,
                                                         launch=torch.library.wrap_triton))


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    _, residual, weight, bias, eps, _ = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.residual_dtype = residual.dtype
    ctx.has_bias = bias is not None
    ctx.eps = eps


def _backward(ctx, dh, dy, *_):
    """The inputs' gradients; ctx.raw_backward is the raw backward (the custom op, or in
    eager mode the backend's launcher). dh or dy may be None where that output was not used."""
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # the normalised rows were not used: only the sum's gradient flows
        dx = torch.zeros_like(h) if dh is None else dh
        return dx, dx.to(ctx.residual_dtype), None, None, None, None
    need_w = weight is not None and ctx.needs_input_grad[2]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    if torch.is_grad_enabled():  # create_graph=True: h, saved as an output, leads back through this op
        dx, dw, db = differentiable_grads(lambda h, w, b: layer_norm_reference(h, w, b, ctx.eps).to(dy.dtype),
                                          (h, weight, stand_in(h, h.shape[-1:], need_b)), (True, need_w, need_b),
                                          (dy,))
        dx = dx if dh is None else dx + dh
        dres = dx.to(ctx.residual_dtype)
    else:
        dx, dres, dw, db = ctx.raw_backward(unit_last_stride(dy), dh, h, weight, mean, rstd, ctx.residual_dtype,
                                            need_w, need_b)
    if ctx.residual_dtype == h.dtype:  # the residual's gradient is dx itself (the op returns it empty)
        dres = dx
    return dx, dres, dw if need_w else None, db if need_b else None, None, None


register_formula(add_layer_norm_fwd, add_layer_norm_bwd, _setup_context, _backward)
register_formula(add_layer_norm_fwd_triton, add_layer_norm_bwd_triton, _setup_context, _backward)


class _EagerAddLayerNorm(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype, backend):
        ctx.set_materialize_grads(False)
        out = backend.add_layer_norm_forward(x, residual, weight, bias, eps, out_dtype)
        _setup_context(ctx, (x, residual, weight, bias, eps, out_dtype), out)
        ctx.raw_backward = backend.add_layer_norm_backward
        return out[0], out[1]

    @staticmethod
    def backward(ctx, dh, dy):
        return *_backward(ctx, dh, dy), None


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
        op = add_layer_norm_fwd_triton if x2d.is_cuda and torch.compiler.is_compiling() else add_layer_norm_fwd
        h, y = op(x2d, r2d, w, b, eps, out_dtype)[:2]
        return h.view(input.shape), y.view(input.shape)
    # eager: the tensors as they are (the kernels take any leading dimensions), so autograd records
    # no reshapes around the op
    return eager_apply(_EagerAddLayerNorm, unit_last_stride(input), unit_last_stride(residual), weight, bias, eps,
                                    out_dtype, backend_for(input))
