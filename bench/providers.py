"""The implementations the kernel benchmarks compare.

A provider is a function with the signature of torch's op. `naive` is the textbook formulation
(matmul, mask, softmax, matmul: for attention, the same function that is the float64 reference);
`compile` is torch.compile of torch's own op.
"""
import torch
import torch.nn.functional as F

import nanofast
from nanofast.testing import attention_reference


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
    "naive": attention_reference,
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
