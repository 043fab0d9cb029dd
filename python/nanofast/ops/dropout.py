"""nanofast::dropout — dropout keyed by a seed, as a torch.library custom op with autograd and a fake
implementation, plus the user-facing `dropout` (F.dropout's signature).

torch's CPU dropout draws a Bernoulli variable per element from one sequential generator: at nanoGPT's
GPU config (16384 x 384 activations, 13 dropouts a step) that alone costs half a second a step on two
cores. Here element i of the (contiguous) tensor survives iff the counter-based generator the attention
kernels use (Philox4x32-10, csrc/philox.h) keeps offset i under a seed drawn from torch's CPU generator:
the mask is a pure function of (seed, i), computed on all threads, never stored (the backward runs the
same kernel on the gradient), and torch.manual_seed makes it reproducible. The masks differ from
torch's own. CUDA tensors use torch's dropout.
"""
import torch
from torch import Tensor

from . import _cpu
from ._validate import check_tensor
from .attention import _seed_value, draw_seed


def _apply(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return _cpu.dropout(x, p, _seed_value(seed))


@torch.library.custom_op("nanofast::dropout_fwd", mutates_args=())
def dropout_fwd(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return _apply(x, p, seed)


@dropout_fwd.register_fake
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.save_for_backward(inputs[2])


def _backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return dropout_fwd(dy.contiguous(), ctx.p, seed), None, None


dropout_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerDropout(torch.autograd.Function):
    """The eager-mode path: the custom op's autograd formula, minus the op dispatch (see layer_norm.py)."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return _apply(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        return _apply(dy.contiguous(), ctx.p, ctx.seed), None, None


def dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """torch.nn.functional.dropout: zero each element with probability p and scale the rest by
    1 / (1 - p); the identity when not training or p == 0."""
    check_tensor("input", input, "nanofast.ops.dropout")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"nanofast.ops.dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if input.device.type != "cpu":
        return torch.nn.functional.dropout(input, p, True)
    seed = draw_seed()
    x = input.contiguous()
    if torch.compiler.is_compiling():
        return dropout_fwd(x, p, seed)
    return _EagerDropout.apply(x, p, seed)
