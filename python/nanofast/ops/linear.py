"""nanofast::linear_fwd / linear_bwd — nn.Linear's product, y = x @ W^T + b, as torch.library custom
ops with autograd and fake implementations, plus the user-facing `linear` (F.linear's signature).

On the CPU the products run nanofast's float32 GEMM (csrc/gemm.h) where the CPU has AVX-512: torch's
float32 matmul there is MKL's AVX2 code on AMD CPUs, at half the rate the FMA units allow, and the
matmuls are most of a float32 training step. Under bfloat16 autocast on CPUs with AVX512-BF16 they run
nanofast's bfloat16 GEMM (csrc/gemm_bf16.h) on the float32 weights, rounded while packed instead of
cast copies; the weight gradient comes out as float32 sums, not rounded to bfloat16 first. float64,
bfloat16 and other CPUs use torch's matmul through the same autograd formula; CUDA and other devices,
float16, and other autocast regions use torch.nn.functional.linear.

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
    """The eager-mode path: the custom op's autograd formula, minus the op dispatch (see layer_norm.py).
    dtype: the products' dtype (bfloat16 under autocast), else None for the input's."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype=None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.dtype = dtype
        return _cpu.linear(x, weight, bias, dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = _cpu.linear_backward(dy, x, weight, need_x, need_w, ctx.has_bias and need_b, ctx.dtype)
        return dx, dw, db, None


_BF16_OPERANDS = (torch.float32, torch.bfloat16)


def _bfloat16_autocast(input, weight, bias):
    """Whether a CPU autocast region asks for bfloat16 products that nanofast's bfloat16 GEMM takes:
    operands it reads, in eager mode (under torch.compile autocast's F.linear is what the graph records),
    and a forward product it runs (below its size, such as sampling's one-row products, autocast's own
    F.linear costs less than the autograd.Function around the same torch matmul)."""
    if torch.compiler.is_compiling() or torch.get_autocast_dtype("cpu") is not torch.bfloat16:
        return False
    if input.dtype not in _BF16_OPERANDS or weight.dtype not in _BF16_OPERANDS or weight.dim() != 2:
        return False
    if bias is not None and not isinstance(bias, Tensor):
        return True  # nanofast's checks, which name it
    if bias is not None and bias.dtype not in _BF16_OPERANDS:
        return False
    out_features, in_features = weight.shape
    if input.dim() == 0 or input.shape[-1] != in_features or (bias is not None and tuple(bias.shape) != (out_features,)):
        return True  # nanofast's checks, which name the shapes
    rows = input.numel() // in_features if in_features else 0
    return _cpu.uses_gemm(rows, out_features, in_features, torch.bfloat16)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """torch.nn.functional.linear: input (..., in) @ weight (out, in)^T + bias (out,)."""
    dtype = None
    if isinstance(input, Tensor) and input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        if not (isinstance(weight, Tensor) and _bfloat16_autocast(input, weight, bias)):
            return F.linear(input, weight, bias)  # autocast picks the dtype and casts the weights itself
        dtype = torch.bfloat16
    elif isinstance(input, Tensor) and (input.device.type != "cpu" or (input.is_floating_point() and not served(input))):
        # torch's: other devices, and float16 (nothing to gain here, and patch() must not break such models)
        return F.linear(input, weight, bias)
    linear_args(input, weight, bias, mixed=dtype is not None)
    x = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    if torch.compiler.is_compiling():  # (never under autocast: see _bfloat16_autocast)
        y = linear_fwd(x, weight, bias)
    else:
        y = _EagerLinear.apply(x, weight, bias, dtype)
    return y if input.dim() == 2 else y.view(*input.shape[:-1], weight.shape[0])
