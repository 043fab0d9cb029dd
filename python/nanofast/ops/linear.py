"""nanofast::linear_fwd / linear_bwd — nn.Linear's product, y = x @ W^T + b, as raw custom ops with
fakes, one autograd formula for them, and the user-facing `linear` (F.linear's signature). The formula
is used as in layer_norm.py: the custom ops' autograd under torch.compile, _EagerLinear around the
launchers in eager mode.

On the CPU the products run nanofast's float32 GEMM (csrc/gemm.h) where the CPU has AVX-512: torch's
float32 matmul there is MKL's AVX2 code on AMD CPUs, well below what the FMA units allow, and the
matmuls are most of a float32 training step. Under bfloat16 autocast on CPUs with AVX512-BF16 they run
nanofast's bfloat16 GEMM (csrc/gemm_bf16.h) on the float32 weights, rounded while packed instead of
cast copies; the weight gradient comes out as float32 sums, not rounded to bfloat16 first. float64,
bfloat16 and other CPUs use torch's matmul through the same autograd formula; backends without a
linear of their own (RUNS_LINEAR False: CUDA), other devices, float16, and other autocast regions use
torch.nn.functional.linear.

Backward: dx = dy @ W, dW = dy^T @ x, db = dy summed over the rows.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu
from .backend import backend_for
from .checks import linear_args, served
from .formula import differentiable_grads, eager_apply, register_formula, stand_in


@torch.library.custom_op("nanofast::linear_fwd", mutates_args=())
def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    return backend_for(x).linear(x, weight, bias, dtype)


@linear_fwd.register_fake
def _(x, weight, bias, dtype=None):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype or x.dtype)


@torch.library.custom_op("nanofast::linear_bwd", mutates_args=())
def linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, need_input_grad: bool, need_weight_grad: bool,
               need_bias_grad: bool = False, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = backend_for(x).linear_backward(dy, x, weight, need_input_grad, need_weight_grad, need_bias_grad,
                                                dtype)
    # Custom ops cannot return None: a gradient that was not asked for comes back empty.
    empty = lambda: x.new_empty((0,))  # noqa: E731
    return empty() if dx is None else dx, empty() if dw is None else dw, empty() if db is None else db


@linear_bwd.register_fake
def _(dy, x, weight, need_input_grad, need_weight_grad, need_bias_grad=False, dtype=None):
    return (x.new_empty(x.shape if need_input_grad else (0,), dtype=dtype or x.dtype),
            weight.new_empty(weight.shape if need_weight_grad else (0,)),
            dy.new_empty((weight.shape[0],) if need_bias_grad else (0,)))


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    x, weight, bias, dtype = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.dtype = dtype


def _backward(ctx, dy):
    """The inputs' gradients; ctx.raw_backward is the raw backward (the custom op, or in eager mode
    the backend's launcher)."""
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = ctx.has_bias and need_b
    if torch.is_grad_enabled():  # create_graph=True
        dtype = ctx.dtype or x.dtype
        reference = lambda x, w, b: F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))  # noqa: E731
        return *differentiable_grads(reference, (x, weight, stand_in(weight, weight.shape[:1], need_b)),
                                     (need_x, need_w, need_b), (dy,)), None
    dx, dw, db = ctx.raw_backward(dy, x, weight, need_x, need_w, need_b, ctx.dtype)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None


register_formula(linear_fwd, linear_bwd, _setup_context, _backward)


class _EagerLinear(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch.
    dtype: the products' dtype (bfloat16 under autocast), else None for the input's."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, backend):
        y = backend.linear(x, weight, bias, dtype)
        _setup_context(ctx, (x, weight, bias, dtype), y)
        ctx.raw_backward = backend.linear_backward
        return y

    @staticmethod
    def backward(ctx, dy):
        return *_backward(ctx, dy), None


_BF16_OPERANDS = (torch.float32, torch.bfloat16)


def _bfloat16_autocast(input, weight, bias):
    """Whether a CPU autocast region asks for bfloat16 products that nanofast's bfloat16 GEMM takes:
    operands it reads, in eager mode (under torch.compile autocast's F.linear is what the graph records),
    and a forward product it runs (the GEMM, or the matrix-vector kernel for a few rows; for other small
    products autocast's own F.linear costs less than the autograd.Function around the same torch matmul)."""
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
    return cpu.uses_gemm(rows, out_features, in_features, torch.bfloat16) or \
        (cpu.uses_gemv(rows, out_features, in_features, torch.bfloat16) and weight.stride(1) == 1)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """torch.nn.functional.linear: input (..., in) @ weight (out, in)^T + bias (out,)."""
    dtype = backend = None
    if isinstance(input, Tensor):
        backend = backend_for(input)
        if not backend.RUNS_LINEAR or (input.is_floating_point() and not served(input)):
            # torch's: backends without a linear of their own, float16 and other devices (nothing to gain
            # there, and patch() must not break such models)
            return F.linear(input, weight, bias)
        if input.is_cpu and torch.is_autocast_enabled("cpu"):
            if not (isinstance(weight, Tensor) and _bfloat16_autocast(input, weight, bias)):
                return F.linear(input, weight, bias)  # autocast picks the dtype and casts the weights itself
            dtype = torch.bfloat16
    linear_args(input, weight, bias, mixed=dtype is not None)
    x = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    if torch.compiler.is_compiling():  # (never under autocast: see _bfloat16_autocast)
        y = linear_fwd(x, weight, bias)
    else:
        y = eager_apply(_EagerLinear, x, weight, bias, dtype, backend)
    return y if input.dim() == 2 else y.view(*input.shape[:-1], weight.shape[0])
