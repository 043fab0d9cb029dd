"""nanofast.kernels: the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

Two layers:

* Launchers, no autograd, plain tensors in and out; nanofast.ops registers them for CUDA tensors:
  ``layer_norm_forward``, ``layer_norm_backward``, ``attention_forward``, ``attention_backward``,
  and ``dropout_mask`` (the attention-dropout mask, from the attention kernels' own helper).
* Autograd-capable functions with torch's signatures: ``layer_norm`` and
  ``scaled_dot_product_attention``.

Importing this package needs neither triton nor a GPU: triton is imported by the submodules, which
load on first use. Without triton, ``HAS_TRITON`` is False and every function raises RuntimeError.
Set TRITON_INTERPRET=1 before the first use to run the kernels on CPU tensors.
"""
import importlib
import importlib.util
import math
import numbers
import sys

import torch

def _has_triton():
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked triton install
        return False


HAS_TRITON = _has_triton()

__all__ = [
    "HAS_TRITON",
    "layer_norm", "scaled_dot_product_attention",
    "layer_norm_forward", "layer_norm_backward",
    "attention_forward", "attention_backward", "dropout_mask",
]


def _load(name):
    """The submodule ``name``, imported on first use (it imports triton)."""
    if not HAS_TRITON:
        raise RuntimeError(
            "nanofast.kernels needs triton, which is not installed (pip install 'nanofast[triton]' or "
            "pip install triton); on CPU tensors use nanofast.ops, which runs the C++ kernels")
    return importlib.import_module(f"{__name__}.{name}")


# --------------------------------------------------------------------------------------------------
# Launchers (no autograd)
# --------------------------------------------------------------------------------------------------

def layer_norm_forward(x2d, weight, bias, eps, **kwargs):
    """(y, mean, rstd) for x2d (N, C) with unit column stride; weight/bias (C,) or None.

    y: (N, C) contiguous, x2d's dtype; mean, rstd: (N,) float32 contiguous.
    """
    return _load("layernorm").layer_norm_forward(x2d, weight, bias, eps, **kwargs)


def layer_norm_backward(dy2d, x2d, weight, mean, rstd, need_weight_grad, need_bias_grad, **kwargs):
    """(dx, dw or None, db or None). dx: (N, C) contiguous, x2d's dtype; dw, db: (C,), the weight's
    dtype (x2d's dtype without a weight). Deterministic (no atomics)."""
    return _load("layernorm").layer_norm_backward(
        dy2d, x2d, weight, mean, rstd, need_weight_grad, need_bias_grad, **kwargs)


def attention_forward(q, k, v, is_causal, scale, dropout_p=0.0, seed=0, **kwargs):
    """(out, lse) for q (B, H, Tq, D), k and v (B, H, Tk, D), any strides.

    out: (B, H, Tq, D), q's dtype, laid out as (B, Tq, H, D) (a transpose(1, 2) view);
    lse: (B, H, Tq) float32 contiguous, natural log. Keyword ``tf32=True`` allows TF32 dots for
    float32 inputs (default: the NANOFAST_TF32=1 environment variable, else IEEE float32).
    """
    return _load("attention").attention_forward(q, k, v, is_causal, scale, dropout_p, seed, **kwargs)


def attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p=0.0, seed=0, **kwargs):
    """(dq, dk, dv), each with its input's shape and dtype, in its input's layout where that is dense with a
    unit last stride, else laid out as (B, T, H, D). Deterministic."""
    return _load("attention").attention_backward(
        dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed, **kwargs)


def dropout_mask(seed, batch, heads, q_len, k_len, p, **kwargs):
    """bool (batch, heads, q_len, k_len), True where attention dropout keeps the element."""
    return _load("attention").dropout_mask(seed, batch, heads, q_len, k_len, p, **kwargs)


# --------------------------------------------------------------------------------------------------
# User-facing functions (argument checks for the Triton path; the autograd path is nanofast.ops')
# --------------------------------------------------------------------------------------------------

def _check_param(name, p, shape, x):
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(p.shape)}, expected normalized_shape {shape}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but input is on {x.device}")


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """torch.nn.functional.layer_norm on the Triton kernels (autograd-capable)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    normalized_shape = tuple(int(s) for s in normalized_shape)
    n = len(normalized_shape)
    if n == 0 or input.dim() < n or tuple(input.shape[input.dim() - n:]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} does not match the trailing dimensions of "
                         f"input of shape {tuple(input.shape)}")
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"input must be float32, float16 or bfloat16, got {input.dtype}")
    _check_param("weight", weight, normalized_shape, input)
    _check_param("bias", bias, normalized_shape, input)
    from nanofast.ops.layer_norm import _EagerLayerNorm  # the one autograd path, here with these launchers

    C = math.prod(normalized_shape)
    x2d = input.reshape(-1, C)
    if C > 1 and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    w = weight.reshape(-1) if weight is not None else None
    b = bias.reshape(-1) if bias is not None else None
    return _EagerLayerNorm.apply(x2d, w, b, float(eps), sys.modules[__name__]).view(input.shape)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention on the Triton flash-attention kernels.

    Inputs (B, H, T, D), strided views allowed; causal is top-left aligned (key j visible to query i
    iff j <= i). Dropout uses a seed drawn from torch's CPU generator, so torch.manual_seed makes it
    reproducible and the mask equals nanofast.ops.dropout_mask for that seed. The result is a
    (B, H, Tq, D) view of a (B, Tq, H, D) buffer.
    """
    if attn_mask is not None:
        raise ValueError("nanofast scaled_dot_product_attention does not support attn_mask; pass "
                         "attn_mask=None (use is_causal=True for a causal mask)")
    if enable_gqa:
        raise ValueError("nanofast scaled_dot_product_attention does not support enable_gqa=True")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    D = query.shape[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(max(D, 1))  # D == 0 is rejected later
    from nanofast.ops.attention import _EagerAttention, draw_seed  # the one autograd path, with these launchers

    seed = draw_seed() if dropout_p > 0.0 else None
    return _EagerAttention.apply(query, key, value, bool(is_causal), scale, dropout_p, seed, sys.modules[__name__])
