"""nanofast::gelu_fwd / gelu_bwd — exact GELU (the erf form, torch's default) as custom ops, plus the
user-facing `gelu`. CPU tensors run the C++ kernels; CUDA tensors use torch's own GELU kernels, which
are already memory-bound there."""
import torch
from torch import Tensor

from . import _cpu
from ._validate import check_tensor


def _dispatch_fwd(x):
    return _cpu.gelu(x, None) if x.device.type == "cpu" else torch.ops.aten.gelu(x)


def _dispatch_bwd(dy, x):
    return _cpu.gelu(x, dy) if x.device.type == "cpu" else torch.ops.aten.gelu_backward(dy, x)


@torch.library.custom_op("nanofast::gelu_fwd", mutates_args=())
def gelu_fwd(x: Tensor) -> Tensor:
    return _dispatch_fwd(x)


@gelu_fwd.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("nanofast::gelu_bwd", mutates_args=())
def gelu_bwd(dy: Tensor, x: Tensor) -> Tensor:
    return _dispatch_bwd(dy, x)


@gelu_bwd.register_fake
def _(dy, x):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return gelu_bwd(dy.contiguous(), x)


gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerGelu(torch.autograd.Function):
    """The eager-mode path: the custom op's autograd formula, minus the op dispatch (see layer_norm.py)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _dispatch_fwd(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _dispatch_bwd(dy.contiguous(), x)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """torch.nn.functional.gelu with approximate='none' (the erf form)."""
    check_tensor("input", input, "nanofast.ops.gelu")
    if approximate != "none":
        raise NotImplementedError(f"nanofast.ops.gelu: approximate={approximate!r} is not supported, only 'none'")
    x = input.contiguous()
    if torch.compiler.is_compiling():
        return gelu_fwd(x)
    return _EagerGelu.apply(x)
