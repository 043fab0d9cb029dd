"""nanofast::linear_cross_entropy_fwd / _bwd — an output projection and its cross-entropy loss,
F.cross_entropy(F.linear(x, W, b), target), computed a chunk of rows at a time so that the (N, V)
logits are never stored whole (chunked_cross_entropy.py), as raw custom ops with fakes, one autograd
formula for them, and the user-facing `linear_cross_entropy`.

The forward of "mean" and "sum" also computes the loss's gradients, chunk by chunk, while it has each
chunk's logits (Liger-Kernel's approach): the input's, and the weight's and bias's summed over the
chunks. It keeps them in the accumulation dtype, and the backward scales them by the incoming gradient
(in eager mode on the CPU it hands them on as they are when that is 1, without a copy). "none" needs
each row's incoming gradient inside the sums, so its backward computes the chunks again with them.

On the CPU the products run on nanofast's GEMMs where ops.linear's do (cpu.mm) and each chunk's row
pass is one C++ sweep (csrc/cross_entropy.h); on CUDA torch's matmuls and torch ops. Under bfloat16
autocast the products are bfloat16 with float32 sums and the loss float32, as autocast's F.linear and
F.cross_entropy give.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import backend_for
from .checks import linear_cross_entropy_args, served
from .chunked_cross_entropy import accumulation_dtype, loss_dtype
from .formula import differentiable_grads, register_formula, stand_in


def _empty(x):
    return x.new_empty((0,))  # a gradient not asked for (custom ops cannot return None)


@torch.library.custom_op("nanofast::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                             label_smoothing: float, reduction: str, dtype: Optional[torch.dtype],
                             need_input_grad: bool, need_weight_grad: bool,
                             need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, dx, dw, db = backend_for(x).linear_cross_entropy_forward(
        x, weight, bias, target, ignore_index, label_smoothing, reduction, dtype, need_input_grad, need_weight_grad,
        need_bias_grad)
    return loss, _empty(x) if dx is None else dx, _empty(x) if dw is None else dw, _empty(x) if db is None else db


@linear_cross_entropy_fwd.register_fake
def _(x, weight, bias, target, ignore_index, label_smoothing, reduction, dtype, need_input_grad, need_weight_grad,
      need_bias_grad):
    acc = accumulation_dtype(dtype or x.dtype)
    grads = reduction != "none"
    return (x.new_empty(x.shape[:1] if reduction == "none" else (), dtype=loss_dtype(x, dtype)),
            x.new_empty(x.shape if need_input_grad and grads else (0,), dtype=acc),
            x.new_empty(weight.shape if need_weight_grad and grads else (0,), dtype=acc),
            x.new_empty(weight.shape[:1] if need_bias_grad and grads else (0,), dtype=acc))


@torch.library.custom_op("nanofast::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(dloss: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             ignore_index: int, label_smoothing: float, dtype: Optional[torch.dtype],
                             need_input_grad: bool, need_weight_grad: bool,
                             need_bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = backend_for(x).linear_cross_entropy_backward(
        dloss, x, weight, bias, target, ignore_index, label_smoothing, dtype, need_input_grad, need_weight_grad,
        need_bias_grad)
    return _empty(x) if dx is None else dx, _empty(x) if dw is None else dw, _empty(x) if db is None else db


@linear_cross_entropy_bwd.register_fake
def _(dloss, x, weight, bias, target, ignore_index, label_smoothing, dtype, need_input_grad, need_weight_grad,
      need_bias_grad):
    acc = accumulation_dtype(dtype or x.dtype)
    return (x.new_empty(x.shape if need_input_grad else (0,), dtype=acc),
            x.new_empty(weight.shape if need_weight_grad else (0,), dtype=acc),
            x.new_empty(weight.shape[:1] if need_bias_grad else (0,), dtype=acc))


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    x, weight, bias, target, ignore_index, label_smoothing, reduction, dtype = inputs[:8]
    _, dx, dw, db = output
    ctx.save_for_backward(x, weight, bias, target, dx, dw, db)
    ctx.settings = ignore_index, label_smoothing, reduction, dtype
    ctx.reads_dloss = False  # whether the backward may read dloss's value on the host (eager CPU calls)


def _reference(target, ignore_index, label_smoothing, reduction, dtype):
    """The op in torch's differentiable functions (for create_graph=True)."""
    out_dtype = torch.float32 if dtype is not None else None

    def reference(x, weight, bias):
        d = dtype or x.dtype
        logits = F.linear(x.to(d), weight.to(d), None if bias is None else bias.to(d))
        return F.cross_entropy(logits if out_dtype is None else logits.to(out_dtype), target,
                               ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    return reference


def _backward(ctx, dloss, *unused):
    """The inputs' gradients (None for the non-tensor arguments); ctx.raw_backward is the raw backward
    (the custom op, or in eager mode the backend's launcher), which only "none" calls."""
    x, weight, bias, target, dx, dw, db = ctx.saved_tensors
    ignore_index, label_smoothing, reduction, dtype = ctx.settings
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    rest = (None,) * 8
    if torch.is_grad_enabled():  # create_graph=True
        reference = _reference(target, ignore_index, label_smoothing, reduction, dtype)
        return *differentiable_grads(reference, (x, weight, stand_in(weight, weight.shape[:1], need_b)),
                                     (need_x, need_w, need_b), (dloss,)), *rest
    if reduction == "none":
        dx, dw, db = ctx.raw_backward(dloss, x, weight, bias, target, ignore_index, label_smoothing, dtype, need_x,
                                      need_w, need_b)
    elif not (ctx.reads_dloss and dloss.item() == 1):
        # (never in place: a second backward, retain_graph=True, needs the saved gradients as they were;
        # a compiled graph may reuse their memory for the product itself)
        scale = dloss.to(dx.dtype)
        dx, dw, db = (g * scale if need else None for g, need in ((dx, need_x), (dw, need_w), (db, need_b)))
    return (dx.to(x.dtype) if need_x else None, dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None, *rest)


register_formula(linear_cross_entropy_fwd, linear_cross_entropy_bwd, _setup_context, _backward)


class _EagerLinearCrossEntropy(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch. dtype:
    the products' dtype (bfloat16 under autocast), else None for the input's."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, label_smoothing, reduction, dtype, grad, backend):
        # (needs_input_grad says whether inputs require grad, also under no_grad: grad is the caller's mode)
        needs = tuple(grad and need for need in ctx.needs_input_grad[:3])
        needs = needs[:2] + (needs[2] and bias is not None,)
        inputs = (x, weight, bias, target, ignore_index, label_smoothing, reduction, dtype, *needs)
        output = backend.linear_cross_entropy_forward(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.raw_backward = backend.linear_cross_entropy_backward
        ctx.reads_dloss = x.is_cpu
        return output[0]

    @staticmethod
    def backward(ctx, dloss):
        return *_backward(ctx, dloss)[:8], None, None


def _products_dtype(input):
    """The products' dtype under autocast (None without): CPU autocast's bfloat16, which nanofast's
    bfloat16 GEMM or torch's matmul computes; CUDA autocast's dtype. False for an autocast region the
    op leaves to torch (float16 on the CPU)."""
    device = "cuda" if input.is_cuda else "cpu"
    if not torch.is_autocast_enabled(device) or input.dtype == torch.float64:  # (autocast leaves float64 alone)
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if input.is_cuda or dtype is torch.bfloat16 else False


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """F.cross_entropy(F.linear(input, weight, bias), target, ignore_index=ignore_index,
    label_smoothing=label_smoothing, reduction=reduction) without storing the logits: input (..., in),
    weight (classes, in), bias (classes,) or None, target (...) of int64 class indices. Returns the
    loss: 0-d for "mean" and "sum", target's shape for "none"."""
    dtype = None
    if isinstance(input, Tensor) and input.is_floating_point():
        dtype = _products_dtype(input) if input.is_cpu or input.is_cuda else None
        if dtype is False or not served(input):  # float16 on the CPU, other devices: torch's
            return F.cross_entropy(F.linear(input, weight, bias), target, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing, reduction=reduction)
    ignore_index, label_smoothing, reduction = linear_cross_entropy_args(
        input, weight, target, bias, ignore_index, label_smoothing, reduction, mixed=dtype is not None)
    x = input.reshape(-1, input.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = target.reshape(-1)
    if torch.compiler.is_compiling():
        grad = torch.is_grad_enabled()
        needs = (grad and x.requires_grad, grad and weight.requires_grad,
                 grad and bias is not None and bias.requires_grad)
        loss = linear_cross_entropy_fwd(x, weight, bias, t, ignore_index, label_smoothing, reduction, dtype, *needs)[0]
    else:
        loss = _EagerLinearCrossEntropy.apply(x, weight, bias, t, ignore_index, label_smoothing, reduction, dtype,
                                              torch.is_grad_enabled(), backend_for(x))
    return loss.view(target.shape) if reduction == "none" else loss
