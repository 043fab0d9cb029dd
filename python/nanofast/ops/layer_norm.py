"""nanofast::layer_norm — a torch.library custom op with autograd and a fake implementation.

The op works on a 2-D (N, C) view whose last dimension is packed; `layer_norm` below reshapes any
input into that form. CPU tensors run the C++ kernels, CUDA tensors the Triton ones.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _cpu, _cuda
from ._validate import layer_norm_args, unit_last_stride


@torch.library.custom_op("nanofast::layer_norm_fwd", mutates_args=(), device_types="cpu")
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return _cpu.layer_norm_forward(x, weight, bias, eps)


@layer_norm_fwd.register_kernel("cuda")
def _(x, weight, bias, eps):
    return _cuda.kernels().layer_norm_forward(x, weight, bias, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    N = x.shape[0]
    return x.new_empty(x.shape), x.new_empty((N,), dtype=acc), x.new_empty((N,), dtype=acc)


def _or_empty(x, dx, dw, db):
    def empty():
        return x.new_empty((0,))

    return dx, empty() if dw is None else dw, empty() if db is None else db


@torch.library.custom_op("nanofast::layer_norm_bwd", mutates_args=(), device_types="cpu")
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   need_weight_grad: bool, need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    # Custom ops cannot return None: a gradient that was not asked for comes back as an empty tensor.
    return _or_empty(x, *_cpu.layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad))


@layer_norm_bwd.register_kernel("cuda")
def _(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad):
    return _or_empty(x, *_cuda.kernels().layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad,
                                                             need_bias_grad))


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad):
    C = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((C if need_weight_grad else 0,)), x.new_empty((C if need_bias_grad else 0,))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = layer_norm_bwd(unit_last_stride(dy), x, weight, mean, rstd, need_w, need_b)
    return dx, dw if need_w else None, db if need_b else None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Same meaning as torch.nn.functional.layer_norm: normalise over the trailing `normalized_shape`."""
    normalized_shape, eps = layer_norm_args(input, normalized_shape, weight, bias, eps)
    C = 1
    for s in normalized_shape:
        C *= s
    x2d = unit_last_stride(input).reshape(-1, C)
    x2d = unit_last_stride(x2d)
    w = None if weight is None else weight.reshape(C)
    b = None if bias is None else bias.reshape(C)
    y, _, _ = layer_norm_fwd(x2d, w, b, eps)
    return y.view(input.shape)
