"""nanofast::layer_norm_fwd / layer_norm_bwd — torch.library custom ops with autograd and fake
implementations, plus the user-facing `layer_norm`.

The ops work on a 2-D (N, C) view whose last dimension is packed; `layer_norm` reshapes any input
into that form. CPU tensors run the C++ kernels, CUDA tensors the Triton ones.

In eager mode `layer_norm` calls the same launchers through a torch.autograd.Function: the custom-op
dispatch costs about 25 µs per forward+backward, as much as the kernels themselves at nanoGPT's CPU
shapes. Under torch.compile the custom ops are what the graph records.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._launch import launchers
from ._validate import layer_norm_args, unit_last_stride


@torch.library.custom_op("nanofast::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return launchers(x).layer_norm_forward(x, weight, bias, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    N = x.shape[0]
    return x.new_empty(x.shape), x.new_empty((N,), dtype=acc), x.new_empty((N,), dtype=acc)


@torch.library.custom_op("nanofast::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   need_weight_grad: bool, need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = launchers(x).layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad)
    # Custom ops cannot return None: a gradient that was not asked for comes back empty.
    return dx, x.new_empty((0,)) if dw is None else dw, x.new_empty((0,)) if db is None else db


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad):
    C = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((C if need_weight_grad else 0,)), x.new_empty((C if need_bias_grad else 0,))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _grads_wanted(ctx, weight):
    return weight is not None and ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_w, need_b = _grads_wanted(ctx, weight)
    dx, dw, db = layer_norm_bwd(unit_last_stride(dy), x, weight, mean, rstd, need_w, need_b)
    return dx, dw if need_w else None, db if need_b else None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayerNorm(torch.autograd.Function):
    """The eager-mode path: the custom op's autograd formula, minus the op dispatch. `launch` forces a
    set of launchers (nanofast.kernels uses it to run Triton on any device); by default the tensor's
    device picks them."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, launch=None):
        ctx.launch = launch or launchers(x)
        out = ctx.launch.layer_norm_forward(x, weight, bias, eps)
        _setup_context(ctx, (x, weight, bias, eps), out)
        return out[0]

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need_w, need_b = _grads_wanted(ctx, weight)
        dx, dw, db = ctx.launch.layer_norm_backward(unit_last_stride(dy), x, weight, mean, rstd, need_w, need_b)
        return dx, dw, db, None, None


def layer_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Same meaning as torch.nn.functional.layer_norm: normalise over the trailing `normalized_shape`."""
    normalized_shape, eps = layer_norm_args(input, normalized_shape, weight, bias, eps)
    if len(normalized_shape) == 1 and input.dim() == 2 and (input.stride(1) == 1 or input.shape[1] <= 1):
        x2d, w, b = input, weight, bias  # already the (N, C) form the kernels take
    else:
        C = math.prod(normalized_shape)
        x2d = unit_last_stride(unit_last_stride(input).reshape(-1, C))
        w = None if weight is None else weight.reshape(C)
        b = None if bias is None else bias.reshape(C)
    if torch.compiler.is_compiling():
        y = layer_norm_fwd(x2d, w, b, eps)[0]
    else:
        y = _EagerLayerNorm.apply(x2d, w, b, eps)
    return y if x2d is input else y.view(input.shape)
