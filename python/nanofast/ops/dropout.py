"""nanofast::dropout_fwd — dropout keyed by a seed, as a raw custom op with a fake, one autograd
formula for it, and the user-facing `dropout` (F.dropout's signature).

torch's CPU dropout draws a Bernoulli variable per element from one sequential generator, on one
thread. Here element i of the (contiguous) tensor survives iff the counter-based generator the
attention kernels use (Philox4x32-10, csrc/philox.h) keeps offset i under a seed drawn from torch's
CPU generator (seed.py): the mask is a pure function of (seed, i), computed on all threads, never
stored (the backward runs the same kernel on the gradient), and torch.manual_seed makes it
reproducible. The masks differ from torch's own. Backends without a dropout kernel (RUNS_DROPOUT
False: CUDA) use torch's dropout. The formula is used as in layer_norm.py: the custom op's autograd
under torch.compile, _EagerDropout around the launcher in eager mode.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import backend_for
from .checks import check_probability, check_tensor
from .formula import eager_apply, register_formula
from .seed import draw_seed


@torch.library.custom_op("nanofast::dropout_fwd", mutates_args=())
def dropout_fwd(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return backend_for(x).dropout(x, p, seed)


@dropout_fwd.register_fake
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    # the seed, an input that never needs a gradient, is kept as an attribute: save_for_backward's
    # bookkeeping would cost more than the rest of the formula
    ctx.p, ctx.seed = inputs[1], inputs[2]


def _backward(ctx, dy):
    """x's gradient: the same mask on dy; ctx.raw_backward is the raw op itself (the custom op, or in
    eager mode the backend's launcher). Under create_graph=True it is written in torch ops (dropout is
    linear, so the mask applied to ones is its one factor), as formula.differentiable_grads does for
    the other ops."""
    if torch.is_grad_enabled():  # create_graph=True: the mask as a constant factor, dy's graph kept
        return dy * ctx.raw_backward(dy.new_ones(dy.shape), ctx.p, ctx.seed), None, None
    return ctx.raw_backward(dy.contiguous(), ctx.p, ctx.seed), None, None


register_formula(dropout_fwd, dropout_fwd, _setup_context, _backward)


class _EagerDropout(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launcher, without the op dispatch."""

    @staticmethod
    def forward(ctx, x, p, seed, backend):
        y = backend.dropout(x, p, seed)
        _setup_context(ctx, (x, p, seed), y)
        ctx.raw_backward = backend.dropout
        return y

    @staticmethod
    def backward(ctx, dy):
        return *_backward(ctx, dy), None


def dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """torch.nn.functional.dropout: zero each element with probability p and scale the rest by
    1 / (1 - p); the identity when not training or p == 0."""
    fn = "nanofast.ops.dropout"
    check_tensor("input", input, fn)
    p = check_probability(fn, "p", p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    backend = backend_for(input)
    if not backend.RUNS_DROPOUT:
        return F.dropout(input, p, True)
    seed = draw_seed()
    x = input.contiguous()
    if torch.compiler.is_compiling():
        return dropout_fwd(x, p, seed)
    return eager_apply(_EagerDropout, x, p, seed, backend)
