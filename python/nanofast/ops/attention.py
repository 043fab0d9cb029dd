"""nanofast::sdpa_fwd / sdpa_bwd — flash attention's raw forward and backward as torch.library custom
ops with fake implementations, one autograd formula for them, and the user-facing
`scaled_dot_product_attention`. The backend (backend.py) runs them: the C++ kernels for CPU tensors,
Triton for CUDA tensors. The formula is used as in layer_norm.py: the custom ops' autograd under
torch.compile, _EagerAttention around the launchers in eager mode.

Beyond torch's function: key/value heads shared by groups of query heads (grouped-query attention)
without copies, masks read in place through their strides (broadcast dims never materialised), and a
sliding window (`window=`, Mistral's: query i sees keys i - window < j <= i). A query that sees no key
gets zeros, as torch gives; an additive mask gets no gradient (one that requires grad is refused).

Under torch.compile, CUDA tensors go to the ops' triton_op twins (sdpa_fwd_triton / sdpa_bwd_triton),
whose kernel launches the compiler records itself.

Dropout is keyed by a seed (seed.py: an int64 tensor drawn from the generator of the tensors' device
when dropout is on): the mask is a pure function of the seed and each score's coordinates,
regenerated in the backward pass rather than stored, and identical on CPU and GPU for the same seed.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._layout import empty_bthd, empty_grad_like, unit_last_stride
from ..testing import attention_reference
from . import cpu, cuda
from .backend import backend_for
from .checks import attention_args, dropout_mask_args, window_arg
from .formula import differentiable_grads, eager_apply, register_formula
from .seed import draw_seed


@torch.library.custom_op("nanofast::sdpa_fwd", mutates_args=())
def sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, dropout_p: float,
             seed: Optional[Tensor], attn_mask: Optional[Tensor] = None, window: int = 0) -> Tuple[Tensor, Tensor]:
    return backend_for(q).attention_forward(q, k, v, is_causal, scale, dropout_p, seed, attn_mask, window)


@sdpa_fwd.register_fake
def _(q, k, v, is_causal, scale, dropout_p, seed, attn_mask=None, window=0):
    B, NH, TQ, _ = q.shape
    out = empty_bthd(B, NH, TQ, v.shape[3], q)
    return out, q.new_empty((B, NH, TQ), dtype=backend_for(q).stats_dtype(q.dtype))


@torch.library.custom_op("nanofast::sdpa_bwd", mutates_args=())
def sdpa_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool, scale: float,
             dropout_p: float, seed: Optional[Tensor], attn_mask: Optional[Tensor] = None,
             window: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    return backend_for(q).attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed, attn_mask,
                                             window)


@sdpa_bwd.register_fake
def _(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed, attn_mask=None, window=0):
    return empty_grad_like(q), empty_grad_like(k), empty_grad_like(v)


# The CUDA twins for torch.compile: triton_ops, whose bodies torch.compile traces (the fakes are the
# bodies themselves), so that a compiled graph launches the Triton kernels without nanofast's Python.

@torch.library.triton_op("nanofast::sdpa_fwd_triton", mutates_args=())
def sdpa_fwd_triton(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, dropout_p: float,
                    seed: Optional[Tensor], attn_mask: Optional[Tensor] = None,
                    window: int = 0) -> Tuple[Tensor, Tensor]:
    return cuda.attention_forward(q, k, v, is_causal, scale, dropout_p, seed, attn_mask, window,
                                  launch=torch.library.wrap_triton)


@torch.library.triton_op("nanofast::sdpa_bwd_triton", mutates_args=())
def sdpa_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool,
                    scale: float, dropout_p: float, seed: Optional[Tensor], attn_mask: Optional[Tensor] = None,
                    window: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    return cuda.attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed, attn_mask, window,
                                   launch=torch.library.wrap_triton)


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    q, k, v, is_causal, scale, dropout_p, seed, attn_mask, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed, attn_mask)
    ctx.is_causal, ctx.scale, ctx.dropout_p, ctx.window = is_causal, scale, dropout_p, window


_NO_GRADS = (None,) * 6  # is_causal, scale, dropout_p, seed, attn_mask (no gradient: see the module), window


def _backward(ctx, dout, *_):
    """The inputs' gradients; ctx.raw_backward is the raw backward (the custom op, or in eager
    mode the backend's launcher)."""
    q, k, v, out, lse, seed, attn_mask = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        keep = None if ctx.dropout_p == 0 else cpu.dropout_mask(seed, *q.shape[:3], k.shape[2], ctx.dropout_p)
        return *differentiable_grads(
            lambda q, k, v: _reference(q, k, v, ctx.is_causal, ctx.scale, keep, ctx.dropout_p, attn_mask, ctx.window),
            (q, k, v), ctx.needs_input_grad[:3], (dout,)), *_NO_GRADS
    dq, dk, dv = ctx.raw_backward(unit_last_stride(dout), q, k, v, out, lse, ctx.is_causal, ctx.scale, ctx.dropout_p,
                                  seed, attn_mask, ctx.window)
    return dq, dk, dv, *_NO_GRADS


def _reference(q, k, v, is_causal, scale, keep, p, attn_mask, window):
    """The forward in torch's differentiable functions (textbook attention, O(T^2) memory), in float32
    at least."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    return attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), is_causal, scale, keep, p, attn_mask,
                               window).to(q.dtype)


register_formula(sdpa_fwd, sdpa_bwd, _setup_context, _backward)
register_formula(sdpa_fwd_triton, sdpa_bwd_triton, _setup_context, _backward)


class _EagerAttention(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale, dropout_p, seed, attn_mask, window, backend):
        out = backend.attention_forward(q, k, v, is_causal, scale, dropout_p, seed, attn_mask, window)
        _setup_context(ctx, (q, k, v, is_causal, scale, dropout_p, seed, attn_mask, window), out)
        ctx.raw_backward = backend.attention_backward
        return out[0]

    @staticmethod
    def backward(ctx, dout):
        return *_backward(ctx, dout), None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, window: Optional[int] = None) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention for (B, H, T, D) inputs, strided views allowed.

    attn_mask: bool (True: the key takes part) or additive (float32 or the inputs' dtype), broadcast over
    (B, H, Tq, Tk) as torch does, read in place; with is_causal=True both apply. enable_gqa: key and
    value may have Hkv heads dividing H (query head h reads head h // (H // Hkv)), never copied.
    window (nanofast's extension, with is_causal=True): query i sees only keys i - window < j <= i.
    A query that sees no key gets zeros. The additive mask gets no gradient.

    The output is laid out as (B, T, H, D) in memory (returned as a (B, H, T, D) view), so the usual
    `y.transpose(1, 2).contiguous()` that follows attention costs nothing.
    """
    return attention_on(None, "nanofast.ops.scaled_dot_product_attention", query, key, value, attn_mask, dropout_p,
                        is_causal, scale, enable_gqa, window)


def attention_on(backend, fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window=None):
    """scaled_dot_product_attention on a given backend (None: the tensors'; nanofast.kernels passes the
    Triton one, for CPU tensors too), with fn naming the function in error messages."""
    dropout_p, scale = attention_args(query, key, value, attn_mask, dropout_p, scale, enable_gqa, fn, backend)
    window = window_arg(fn, window, is_causal)
    seed = draw_seed(query.device) if dropout_p > 0 else None
    q, k, v = (unit_last_stride(t) for t in (query, key, value))
    if backend is None and torch.compiler.is_compiling():
        return (sdpa_fwd_triton if q.is_cuda else sdpa_fwd)(q, k, v, bool(is_causal), scale, dropout_p, seed, attn_mask,
                                                            window)[0]
    return eager_apply(_EagerAttention, q, k, v, bool(is_causal), scale, dropout_p, seed, attn_mask, window,
                       backend or backend_for(q))


def dropout_mask(seed: int, batch: int, heads: int, q_len: int, k_len: int, p: float) -> Tensor:
    """The (batch, heads, q_len, k_len) bool mask of kept scores that the attention kernels apply for
    `seed` and dropout probability `p` (on any device: it is computed on the CPU)."""
    return cpu.dropout_mask(*dropout_mask_args("nanofast.ops.dropout_mask", seed, batch, heads, q_len, k_len, p))
