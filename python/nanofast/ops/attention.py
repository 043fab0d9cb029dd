"""nanofast::sdpa — flash attention as a torch.library custom op with autograd and a fake
implementation. CPU tensors run the C++ kernels, CUDA tensors the Triton ones.

Dropout is keyed by a seed (an int64 tensor, drawn from torch's CPU generator when dropout is on):
the mask is a pure function of the seed and each score's coordinates, regenerated in the backward
pass rather than stored, and identical on CPU and GPU.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _cpu
from .._layout import empty_bthd, empty_grad_like
from ._launch import launchers
from ._validate import attention_args, unit_last_stride

_SEED_BOUND = 2**62


def _seed_value(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


@torch.library.custom_op("nanofast::sdpa_fwd", mutates_args=())
def sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float, dropout_p: float,
             seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return launchers(q).attention_forward(q, k, v, is_causal, scale, dropout_p, _seed_value(seed))


@sdpa_fwd.register_fake
def _(q, k, v, is_causal, scale, dropout_p, seed):
    B, NH, TQ, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = empty_bthd(B, NH, TQ, v.shape[3], q)
    return out, q.new_empty((B, NH, TQ), dtype=acc)


@torch.library.custom_op("nanofast::sdpa_bwd", mutates_args=())
def sdpa_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, is_causal: bool, scale: float,
             dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    return launchers(q).attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p, _seed_value(seed))


@sdpa_bwd.register_fake
def _(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed):
    return empty_grad_like(q), empty_grad_like(k), empty_grad_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, is_causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.is_causal, ctx.scale, ctx.dropout_p = is_causal, scale, dropout_p


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = sdpa_bwd(unit_last_stride(dout), q, k, v, out, lse, ctx.is_causal, ctx.scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None


sdpa_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The eager-mode path: the custom op's autograd formula, minus the op dispatch (see layer_norm.py;
    `launch` likewise forces a set of launchers)."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal, scale, dropout_p, seed, launch=None):
        ctx.launch = launch or launchers(q)
        out = ctx.launch.attention_forward(q, k, v, is_causal, scale, dropout_p, _seed_value(seed))
        _setup_context(ctx, (q, k, v, is_causal, scale, dropout_p, seed), out)
        return out[0]

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seed = ctx.saved_tensors
        dq, dk, dv = ctx.launch.attention_backward(unit_last_stride(dout), q, k, v, out, lse, ctx.is_causal,
                                                   ctx.scale, ctx.dropout_p, _seed_value(seed))
        return dq, dk, dv, None, None, None, None, None


def draw_seed() -> Tensor:
    """A dropout seed from torch's CPU generator, so torch.manual_seed makes dropout reproducible."""
    return torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention for (B, H, T, D) inputs, strided views allowed.

    The output is laid out as (B, T, H, D) in memory (returned as a (B, H, T, D) view), so the usual
    `y.transpose(1, 2).contiguous()` that follows attention costs nothing.
    """
    dropout_p, scale = attention_args(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    seed = draw_seed() if dropout_p > 0 else None
    q, k, v = (unit_last_stride(t) for t in (query, key, value))
    if torch.compiler.is_compiling():
        return sdpa_fwd(q, k, v, bool(is_causal), scale, dropout_p, seed)[0]
    return _EagerAttention.apply(q, k, v, bool(is_causal), scale, dropout_p, seed)


def dropout_mask(seed: int, batch: int, heads: int, q_len: int, k_len: int, p: float) -> Tensor:
    """The (batch, heads, q_len, k_len) bool mask of kept scores that the attention kernels apply for
    `seed` and dropout probability `p` (on any device: it is computed on the CPU)."""
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"nanofast.ops.dropout_mask: p must be in [0, 1), got {p}")
    sizes = dict(batch=batch, heads=heads, q_len=q_len, k_len=k_len)
    for name, n in sizes.items():
        if int(n) < 0:
            raise ValueError(f"nanofast.ops.dropout_mask: {name} must be >= 0, got {n}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"nanofast.ops.dropout_mask: seed must be in [0, 2**64), got {seed}")
    return _cpu.dropout_mask(int(seed), int(batch), int(heads), int(q_len), int(k_len), float(p))
