"""The implementations the kernel benchmarks compare, and the float64 references they are checked against.

A provider is a function with the signature of torch's op. `naive` is the textbook formulation
(matmul, mask, softmax, matmul); `compile` is torch.compile of torch's own op.
"""
import math

import torch
import torch.nn.functional as F

import nanofast


def naive_attention(q, k, v, is_causal=False, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def naive_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """The textbook formula, computed in float32 at least (as mixed-precision code would)."""
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    return (y * weight + bias).to(x.dtype)


_compiled = {}


def _compiled_fn(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


ATTENTION = {
    "nanofast": nanofast.ops.scaled_dot_product_attention,
    "torch": F.scaled_dot_product_attention,
    "compile": lambda *a, **k: _compiled_fn(F.scaled_dot_product_attention)(*a, **k),
    "naive": naive_attention,
}

LAYER_NORM = {
    "nanofast": nanofast.ops.layer_norm,
    "torch": F.layer_norm,
    "compile": lambda *a, **k: _compiled_fn(F.layer_norm)(*a, **k),
    "naive": naive_layer_norm,
}


def attention_flops(B, H, T, D, causal, backward):
    """Matmul FLOPs that matter: QK^T and PV forward (halved when causal); backward does 2.5x more."""
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return fwd * (3.5 if backward else 1.0)


def layer_norm_bytes(N, C, elem, backward):
    """Compulsory traffic: forward reads x, writes y; backward reads dy and x, writes dx."""
    return N * C * elem * (5 if backward else 2)


def parity_error(ours, theirs, ref64):
    """(max|ours - ref64|, max|torch - ref64|) over every tensor of the result."""
    err = lambda a, r: max((x.double() - y).abs().max().item() for x, y in zip(a, r))
    return err(ours, ref64), err(theirs, ref64)
