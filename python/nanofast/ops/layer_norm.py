"""nanofast::layer_norm_fwd / layer_norm_bwd — LayerNorm's raw forward and backward as torch.library
custom ops with fake implementations, one autograd formula for them, and the user-facing `layer_norm`.

The ops work on a 2-D (N, C) view whose last dimension is packed; `layer_norm` reshapes any input
into that form. The backend (backend.py) runs them: the C++ kernels for CPU tensors, Triton for CUDA.

The autograd formula (_setup_context, _backward) is written once and used two ways (formula.py):
under torch.compile the graph records the custom ops (on CUDA their triton_op twins, whose kernel
launches the compiler sees), and the formula is their registered autograd;
in eager mode _EagerLayerNorm applies the same formula with the backend's launchers called directly,
because the custom-op dispatch costs as much as the kernels themselves at nanoGPT's CPU shapes.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._layout import unit_last_stride
from . import cuda
from .backend import backend_for
from .checks import layer_norm_args
from .formula import differentiable_grads, eager_apply, register_formula, stand_in


@torch.library.custom_op("nanofast::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return backend_for(x).layer_norm_forward(x, weight, bias, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    stats = backend_for(x).stats_dtype(x.dtype)
    N = x.shape[0]
    return x.new_empty(x.shape), x.new_empty((N,), dtype=stats), x.new_empty((N,), dtype=stats)


@torch.library.custom_op("nanofast::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   need_weight_grad: bool, need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _fixed_arity(x, *backend_for(x).layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad,
                                                                need_bias_grad))


def _fixed_arity(x, dx, dw, db):
    """Custom ops cannot return None: a gradient that was not asked for comes back empty."""
    return dx, x.new_empty((0,)) if dw is None else dw, x.new_empty((0,)) if db is None else db


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad):
    C = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((C if need_weight_grad else 0,)), x.new_empty((C if need_bias_grad else 0,))


# The CUDA twins for torch.compile: triton_ops, whose bodies torch.compile traces (the fakes are the
# bodies themselves), so that a compiled graph launches the Triton kernels without nanofast's Python.

@torch.library.triton_op("nanofast::layer_norm_fwd_triton", mutates_args=())
def layer_norm_fwd_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return cuda.layer_norm_forward(x, weight, bias, eps, launch=torch.library.wrap_triton)


@torch.library.triton_op("nanofast::layer_norm_bwd_triton", mutates_args=())
def layer_norm_bwd_triton(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                          need_weight_grad: bool, need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _fixed_arity(x, *cuda.layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad,
                                                     launch=torch.library.wrap_triton))


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.eps = eps


def _backward(ctx, dy, *_):
    """The inputs' gradients; ctx.raw_backward is the raw backward (the custom op, or in eager
    mode the backend's launcher)."""
    x, weight, mean, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    if torch.is_grad_enabled():  # create_graph=True
        return *differentiable_grads(lambda x, w, b: layer_norm_reference(x, w, b, ctx.eps),
                                     (x, weight, stand_in(x, x.shape[1:], need_b)),
                                     (ctx.needs_input_grad[0], need_w, need_b), (dy,)), None
    dx, dw, db = ctx.raw_backward(unit_last_stride(dy), x, weight, mean, rstd, need_w, need_b)
    return dx, dw if need_w else None, db if need_b else None, None


def layer_norm_reference(x, weight, bias, eps):
    """The forward in torch's differentiable functions (the parameters may have another dtype)."""
    cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
    return F.layer_norm(x, x.shape[-1:], cast(weight), cast(bias), eps)


register_formula(layer_norm_fwd, layer_norm_bwd, _setup_context, _backward)
register_formula(layer_norm_fwd_triton, layer_norm_bwd_triton, _setup_context, _backward)


class _EagerLayerNorm(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend):
        out = backend.layer_norm_forward(x, weight, bias, eps)
        _setup_context(ctx, (x, weight, bias, eps), out)
        ctx.raw_backward = backend.layer_norm_backward
        return out[0]

    @staticmethod
    def backward(ctx, dy):
        return *_backward(ctx, dy), None


def layer_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Same meaning as torch.nn.functional.layer_norm: normalise over the trailing `normalized_shape`."""
    return layer_norm_on(None, "nanofast.ops.layer_norm", input, normalized_shape, weight, bias, eps)


def layer_norm_on(backend, fn, input, normalized_shape, weight, bias, eps):
    """layer_norm on a given backend (None: the tensor's; nanofast.kernels passes the Triton one, for
    CPU tensors too), with fn naming the function in error messages."""
    normalized_shape, eps = layer_norm_args(input, normalized_shape, weight, bias, eps, fn, backend)
    if len(normalized_shape) == 1 and input.dim() == 2 and (input.stride(1) == 1 or input.shape[1] <= 1):
        x2d, w, b = input, weight, bias  # already the (N, C) form the kernels take
    else:
        C = math.prod(normalized_shape)
        x2d = unit_last_stride(unit_last_stride(input).reshape(-1, C))
        w = None if weight is None else weight.reshape(C)
        b = None if bias is None else bias.reshape(C)
    if backend is None and torch.compiler.is_compiling():
        y = (layer_norm_fwd_triton if x2d.is_cuda else layer_norm_fwd)(x2d, w, b, eps)[0]
    else:
        y = eager_apply(_EagerLayerNorm, x2d, w, b, eps, backend or backend_for(x2d))
    return y if x2d is input else y.view(input.shape)
