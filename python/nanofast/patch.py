"""Dropping nanofast's kernels into an existing model."""
import threading
import warnings

import torch
import torch.nn.functional as F

from . import nn as nf_nn
from . import ops
from .ops import checks

_torch_sdpa = F.scaled_dot_product_attention
_route_lock = threading.Lock()
_route_depth = 0
_warned = set()


def _unsupported_reason(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False):
    """Why nanofast cannot serve this call, or None if it can."""
    if attn_mask is not None:
        return "attn_mask"
    if enable_gqa:
        return "enable_gqa"
    try:
        checks.attention_args(query, key, value, None, dropout_p, scale)
    except (TypeError, ValueError) as e:
        return str(e).split(": ", 1)[-1]
    return None


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    reason = _unsupported_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is None:
        return ops.scaled_dot_product_attention(query, key, value, None, dropout_p, is_causal, scale)
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"nanofast.patch: falling back to torch's scaled_dot_product_attention ({reason})",
                      stacklevel=2)
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                       **kwargs)


class _RoutedForward:
    """Wraps a module's forward so that, while it runs, torch.nn.functional.scaled_dot_product_attention
    is nanofast's. A module-level class (not a closure) so patched models still pickle."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        global _route_depth
        with _route_lock:
            if _route_depth == 0:
                F.scaled_dot_product_attention = _routed_sdpa
            _route_depth += 1
        try:
            return self.forward(*args, **kwargs)
        finally:
            with _route_lock:
                _route_depth -= 1
                if _route_depth == 0:
                    F.scaled_dot_product_attention = _torch_sdpa


def _layer_norm(child):
    ln = nf_nn.LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine,
                         bias=child.bias is not None, device="meta")
    ln.weight, ln.bias = child.weight, child.bias  # the same Parameter objects: optimizers keep working
    return ln


def _linear(child):
    lin = nf_nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
    lin.weight, lin.bias = child.weight, child.bias  # the same Parameter objects (tied weights stay tied)
    return lin


def _swap(module: torch.nn.Module, replacements) -> None:
    """Replaces, in place, every submodule whose exact type is a key of `replacements` (subclasses
    such as adapters keep their own forward) by what the key's function builds from it."""
    for name, child in module.named_children():
        make = replacements.get(type(child))
        if make is not None:
            setattr(module, name, make(child))
        else:
            _swap(child, replacements)


def patch(model: torch.nn.Module, layer_norm: bool = True, attention: bool = True,
          linear: bool = True) -> torch.nn.Module:
    """Make `model` run nanofast's kernels, in place, and return it.

    layer_norm: replace torch.nn.LayerNorm submodules by nanofast.nn.LayerNorm, keeping the parameters.
    attention: route the model's calls of torch.nn.functional.scaled_dot_product_attention to
    nanofast.ops; calls nanofast cannot serve (an attn_mask, say) go to torch, with a one-time warning.
    linear: replace torch.nn.Linear submodules by nanofast.nn.Linear (nanofast's float32 GEMM where
    the CPU has AVX-512), keeping the parameters.
    """
    replacements = {}
    if layer_norm:
        replacements[torch.nn.LayerNorm] = _layer_norm
    if linear:
        replacements[torch.nn.Linear] = _linear
    _swap(model, replacements)
    if attention and not isinstance(model.forward, _RoutedForward):
        model.forward = _RoutedForward(model.forward)
    return model
