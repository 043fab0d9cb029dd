"""nanofast::glu_fwd / glu_bwd — a gated MLP's activation, act(gate) * up, as raw custom ops with fakes,
one autograd formula for them, and the user-facing `swiglu` (act = SiLU: Llama, Qwen2, Mistral,
SmolLM) and `geglu` (act = GELU, exact or tanh: Gemma, T5 v1.1). The backward computes both
gradients in one pass from the saved gate and up. The formula is used as in layer_norm.py: the custom
ops' autograd under torch.compile, _EagerGlu around the backend's launchers in eager mode.

gate and up are two tensors of one shape, as Hugging Face's LlamaMLP has them
(`down_proj(act_fn(gate_proj(x)) * up_proj(x))`); a fused projection's halves
(`gate, up = gate_up_proj(x).chunk(2, dim=-1)`, Phi-3's order) are read in place, without a copy.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._layout import unit_last_stride
from .backend import backend_for
from .checks import check_approximate, glu_args
from .formula import differentiable_grads, register_formula


@torch.library.custom_op("nanofast::glu_fwd", mutates_args=())
def glu_fwd(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    return backend_for(gate).glu_forward(unit_last_stride(gate), unit_last_stride(up), activation)


@glu_fwd.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)  # the launchers' outputs are contiguous


@torch.library.custom_op("nanofast::glu_bwd", mutates_args=())
def glu_bwd(dy: Tensor, gate: Tensor, up: Tensor, activation: str) -> Tuple[Tensor, Tensor]:
    return backend_for(gate).glu_backward(dy, unit_last_stride(gate), unit_last_stride(up), activation)


@glu_bwd.register_fake
def _(dy, gate, up, activation):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _backward(ctx, dy):
    """gate's and up's gradients; ctx.raw_backward is the raw backward (the custom op, or in eager mode
    the backend's launcher)."""
    gate, up = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():  # create_graph=True
        reference = lambda g, u: glu_reference(g, u, ctx.activation)  # noqa: E731
        return *differentiable_grads(reference, (gate, up), needs, (dy,)), None
    dgate, dup = ctx.raw_backward(dy, gate, up, ctx.activation)
    return dgate if needs[0] else None, dup if needs[1] else None, None


_TORCH_ACTIVATION = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def glu_reference(gate, up, activation):
    """act(gate) * up in torch's differentiable functions, in the inputs' dtype."""
    return _TORCH_ACTIVATION[activation](gate) * up


register_formula(glu_fwd, glu_bwd, _setup_context, _backward)


class _EagerGlu(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch."""

    @staticmethod
    def forward(ctx, gate, up, activation, backend):
        out = backend.glu_forward(gate, up, activation)
        _setup_context(ctx, (gate, up, activation), out)
        ctx.raw_backward = backend.glu_backward
        return out

    @staticmethod
    def backward(ctx, dy):
        return *_backward(ctx, dy), None


def glu_on(backend, fn, gate, up, activation):
    """act(gate) * up on a given backend (None: the tensors'; nanofast.kernels passes the Triton one),
    with fn naming the function in error messages."""
    glu_args(fn, gate, up, activation, backend)
    gate, up = unit_last_stride(gate), unit_last_stride(up)
    if backend is None and torch.compiler.is_compiling():
        if gate.is_cuda:  # torch's ops, which the compiler fuses into one elementwise kernel with its neighbours
            return glu_reference(gate, up, activation)
        return glu_fwd(gate, up, activation)
    return _EagerGlu.apply(gate, up, activation, backend or backend_for(gate))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """F.silu(gate) * up, forward and backward each in one pass: the SwiGLU of Llama-style MLPs."""
    return glu_on(None, "nanofast.ops.swiglu", gate, up, "silu")


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """F.gelu(gate, approximate=approximate) * up, forward and backward each in one pass: the GEGLU of
    Gemma-style MLPs (approximate='tanh': gelu_pytorch_tanh)."""
    check_approximate("nanofast.ops.geglu", approximate)
    return glu_on(None, "nanofast.ops.geglu", gate, up, "gelu" if approximate == "none" else "gelu_tanh")
