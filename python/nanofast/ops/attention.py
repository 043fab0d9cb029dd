"""nanofast::sdpa_fwd / sdpa_bwd — flash attention's raw forward and backward as torch.library custom
ops with fake implementations, one autograd formula for them, and the user-facing
`scaled_dot_product_attention`. The backend (backend.py) runs them: the C++ kernels for CPU tensors,
Triton for CUDA tensors. The formula is used as in layer_norm.py: the custom ops' autograd under
torch.compile, _EagerAttention around the launchers in eager mode.

Dropout is keyed by a seed (seed.py: an int64 tensor drawn from torch's CPU generator when dropout is
on): the mask is a pure function of the seed and each score's coordinates, regenerated in the backward
pass rather than stored, and identical on CPU and GPU.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._layout import empty_bthd, empty_grad_like, unit_last_stride
from ..testing import attention_reference
from . import cpu
from .backend import backend_for
from .checks import attention_args, dropout_mask_args
from .formula import differentiable_grads, eager_apply, register_formula
from .seed import draw_seed


@torch.library.custom_op("nanofast::sdpa_fwd", mutates_args=())
def sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, dropout_p: float,
             seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return backend_for(q).attention_forward(q, k, v, is_causal, scale, dropout_p, seed)


@sdpa_fwd.register_fake
def _(q, k, v, is_causal, scale, dropout_p, seed):
    B, NH, TQ, _ = q.shape
    out = empty_bthd(B, NH, TQ, v.shape[3], q)
    return out, q.new_empty((B, NH, TQ), dtype=backend_for(q).stats_dtype(q.dtype))


@torch.library.custom_op("nanofast::sdpa_bwd", mutates_args=())
def sdpa_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool, scale: float,
             dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    return backend_for(q).attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed)


@sdpa_bwd.register_fake
def _(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed):
    return empty_grad_like(q), empty_grad_like(k), empty_grad_like(v)


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    q, k, v, is_causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.is_causal, ctx.scale, ctx.dropout_p = is_causal, scale, dropout_p


def _backward(ctx, dout, *_):
    """The inputs' gradients; ctx.raw_backward is the raw backward (the custom op, or in eager
    mode the backend's launcher)."""
    q, k, v, out, lse, seed = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        keep = None if ctx.dropout_p == 0 else cpu.dropout_mask(seed, *q.shape[:3], k.shape[2], ctx.dropout_p)
        return *differentiable_grads(lambda q, k, v: _reference(q, k, v, ctx.is_causal, ctx.scale, keep, ctx.dropout_p),
                                     (q, k, v), ctx.needs_input_grad[:3], (dout,)), None, None, None, None
    dq, dk, dv = ctx.raw_backward(unit_last_stride(dout), q, k, v, out, lse, ctx.is_causal, ctx.scale, ctx.dropout_p,
                                  seed)
    return dq, dk, dv, None, None, None, None


def _reference(q, k, v, is_causal, scale, keep, p):
    """The forward in torch's differentiable functions (textbook attention, O(T^2) memory), in float32
    at least."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    return attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), is_causal, scale, keep, p).to(q.dtype)


register_formula(sdpa_fwd, sdpa_bwd, _setup_context, _backward)


class _EagerAttention(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale, dropout_p, seed, backend):
        out = backend.attention_forward(q, k, v, is_causal, scale, dropout_p, seed)
        _setup_context(ctx, (q, k, v, is_causal, scale, dropout_p, seed), out)
        ctx.raw_backward = backend.attention_backward
        return out[0]

    @staticmethod
    def backward(ctx, dout):
        return *_backward(ctx, dout), None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention for (B, H, T, D) inputs, strided views allowed.

    The output is laid out as (B, T, H, D) in memory (returned as a (B, H, T, D) view), so the usual
    `y.transpose(1, 2).contiguous()` that follows attention costs nothing.
    """
    return attention_on(None, "nanofast.ops.scaled_dot_product_attention", query, key, value, attn_mask, dropout_p,
                        is_causal, scale, enable_gqa)


def attention_on(backend, fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """scaled_dot_product_attention on a given backend (None: the tensors'; nanofast.kernels passes the
    Triton one, for CPU tensors too), with fn naming the function in error messages."""
    dropout_p, scale = attention_args(query, key, value, attn_mask, dropout_p, scale, enable_gqa, fn, backend)
    seed = draw_seed() if dropout_p > 0 else None
    q, k, v = (unit_last_stride(t) for t in (query, key, value))
    if backend is None and torch.compiler.is_compiling():
        return sdpa_fwd(q, k, v, bool(is_causal), scale, dropout_p, seed)[0]
    return eager_apply(_EagerAttention, q, k, v, bool(is_causal), scale, dropout_p, seed, backend or backend_for(q))


def dropout_mask(seed: int, batch: int, heads: int, q_len: int, k_len: int, p: float) -> Tensor:
    """The (batch, heads, q_len, k_len) bool mask of kept scores that the attention kernels apply for
    `seed` and dropout probability `p` (on any device: it is computed on the CPU)."""
    return cpu.dropout_mask(*dropout_mask_args("nanofast.ops.dropout_mask", seed, batch, heads, q_len, k_len, p))
