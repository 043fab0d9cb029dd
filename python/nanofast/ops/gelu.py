"""nanofast::gelu_fwd / gelu_bwd — GELU, exact (the erf form, torch's default) or its tanh
approximation (approximate="tanh": GPT-2's "gelu_new"), as raw custom ops with fakes, one autograd
formula for them, and the user-facing `gelu`. The backend runs them: the C++ kernels for CPU tensors,
torch's own GELU kernels for CUDA tensors (already memory-bound there). The formula is used as in
layer_norm.py: the custom ops' autograd under torch.compile, _EagerGelu around the launchers in eager
mode."""
import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import backend_for
from .checks import check_approximate, check_tensor
from .formula import differentiable_grads, eager_apply, register_formula


@torch.library.custom_op("nanofast::gelu_fwd", mutates_args=())
def gelu_fwd(x: Tensor, approximate: str = "none") -> Tensor:
    return backend_for(x).gelu_forward(x, approximate)


@gelu_fwd.register_fake
def _(x, approximate="none"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # the launchers' outputs are contiguous


@torch.library.custom_op("nanofast::gelu_bwd", mutates_args=())
def gelu_bwd(dy: Tensor, x: Tensor, approximate: str = "none") -> Tensor:
    return backend_for(x).gelu_backward(dy, x, approximate)


@gelu_bwd.register_fake
def _(dy, x, approximate="none"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.approximate = inputs[1] if len(inputs) > 1 else "none"


def _backward(ctx, dy):
    """x's gradient (and None for approximate); ctx.raw_backward is the raw backward (the custom op, or
    in eager mode the backend's launcher)."""
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return differentiable_grads(lambda x: F.gelu(x, approximate=ctx.approximate), (x,), (True,), (dy,))[0], None
    return ctx.raw_backward(dy.contiguous(), x, ctx.approximate), None


register_formula(gelu_fwd, gelu_bwd, _setup_context, _backward)


class _EagerGelu(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch."""

    @staticmethod
    def forward(ctx, x, approximate, backend):
        y = backend.gelu_forward(x, approximate)
        _setup_context(ctx, (x, approximate), y)
        ctx.raw_backward = backend.gelu_backward
        return y

    @staticmethod
    def backward(ctx, dy):
        return *_backward(ctx, dy), None


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """torch.nn.functional.gelu: the erf form (approximate='none') or the tanh approximation
    (approximate='tanh', GPT-2's "gelu_new")."""
    check_tensor("input", input, "nanofast.ops.gelu")
    check_approximate("nanofast.ops.gelu", approximate)
    if not backend_for(input).RUNS_GELU:
        return F.gelu(input, approximate=approximate)
    x = input.contiguous()
    if torch.compiler.is_compiling():
        return gelu_fwd(x, approximate)
    return eager_apply(_EagerGelu, x, approximate, backend_for(x))
