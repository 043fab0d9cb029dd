"""nanofast::gelu_fwd / gelu_bwd — exact GELU (the erf form, torch's default) as raw custom ops with
fakes, one autograd formula for them, and the user-facing `gelu`. The backend runs them: the C++
kernels for CPU tensors, torch's own GELU kernels for CUDA tensors (already memory-bound there). The
formula is used as in layer_norm.py: the custom ops' autograd under torch.compile, _EagerGelu around
the launchers in eager mode."""
import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import backend_for
from .checks import check_tensor
from .formula import differentiable_grads, eager_apply, register_formula


@torch.library.custom_op("nanofast::gelu_fwd", mutates_args=())
def gelu_fwd(x: Tensor) -> Tensor:
    return backend_for(x).gelu_forward(x)


@gelu_fwd.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # the launchers' outputs are contiguous


@torch.library.custom_op("nanofast::gelu_bwd", mutates_args=())
def gelu_bwd(dy: Tensor, x: Tensor) -> Tensor:
    return backend_for(x).gelu_backward(dy, x)


@gelu_bwd.register_fake
def _(dy, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    """x's gradient; ctx.raw_backward is the raw backward (the custom op, or in eager mode the
    backend's launcher)."""
    (x,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return differentiable_grads(F.gelu, (x,), (True,), (dy,))[0]
    return ctx.raw_backward(dy.contiguous(), x)


register_formula(gelu_fwd, gelu_bwd, _setup_context, _backward)


class _EagerGelu(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch."""

    @staticmethod
    def forward(ctx, x, backend):
        y = backend.gelu_forward(x)
        _setup_context(ctx, (x,), y)
        ctx.raw_backward = backend.gelu_backward
        return y

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy), None


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """torch.nn.functional.gelu with approximate='none' (the erf form)."""
    check_tensor("input", input, "nanofast.ops.gelu")
    if approximate != "none":
        raise NotImplementedError(f"nanofast.ops.gelu: approximate={approximate!r} is not supported, only 'none'")
    x = input.contiguous()
    if torch.compiler.is_compiling():
        return gelu_fwd(x)
    return eager_apply(_EagerGelu, x, backend_for(x))
