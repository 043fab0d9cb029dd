"""nanofast::linear_fwd / linear_bwd — nn.Linear's product, y = x @ W^T + b, as torch.library custom
ops with autograd and fake implementations, plus the user-facing `linear` (F.linear's signature).

On the CPU the products run nanofast's float32 GEMM (csrc/gemm.h) where the CPU has AVX-512: torch's
float32 matmul there is MKL's AVX2 code on AMD CPUs, at half the rate the FMA units allow, and the
matmuls are most of a float32 training step. float64, bfloat16 and other CPUs use torch's matmul
through the same autograd formula; CUDA and other devices, float16, and autocast regions (which choose
the dtype themselves) use torch.nn.functional.linear.

Backward: dx = dy @ W, dW = dy^T @ x, db = dy summed over the rows.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpu
from ._validate import linear_args, served


@torch.library.custom_op("nanofast::linear_fwd", mutates_args=())
def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _cpu.linear(x, weight, bias)


@linear_fwd.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("nanofast::linear_bwd", mutates_args=())
def linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, need_input_grad: bool,
               need_weight_grad: bool) -> Tuple[Tensor, Tensor]:
    dx, dw, _ = _cpu.linear_backward(dy, x, weight, need_input_grad, need_weight_grad, False)
    # Custom ops cannot return None: a gradient that was not asked for comes back empty.
    return x.new_empty((0,)) if dx is None else dx, x.new_empty((0,)) if dw is None else dw


@linear_bwd.register_fake
def _(dy, x, weight, need_input_grad, need_weight_grad):
    return (x.new_empty(x.shape if need_input_grad else (0,)),
            x.new_empty(weight.shape if need_weight_grad else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    dx, dw = linear_bwd(dy, x, weight, need_x, need_w)
    db = dy.sum(0) if ctx.has_bias and need_b else None
    return dx if need_x else None, dw if need_w else None, db


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLinear(torch.autograd.Function):
    """The eager-mode path: the custom op's autograd formula, minus the op dispatch (see layer_norm.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _cpu.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        return _cpu.linear_backward(dy, x, weight, need_x, need_w, ctx.has_bias and need_b)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """torch.nn.functional.linear: input (..., in) @ weight (out, in)^T + bias (out,)."""
    if isinstance(input, Tensor) and (input.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                                      or (input.is_floating_point() and not served(input))):
        # torch's: other devices, float16 (nothing to gain here, and patch() must not break such
        # models), and autocast regions, where autocast picks the dtype and casts the weights itself
        return F.linear(input, weight, bias)
    linear_args(input, weight, bias)
    x = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    if torch.compiler.is_compiling():
        y = linear_fwd(x, weight, bias)
    else:
        y = _EagerLinear.apply(x, weight, bias)
    return y if input.dim() == 2 else y.view(*input.shape[:-1], weight.shape[0])
