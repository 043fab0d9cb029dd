"""Attention for models nanofast.patch has patched: one function for torch's
scaled_dot_product_attention calls (patch.py routes them here) and one for Hugging Face transformers'
attention interface, registered there as the implementation "nanofast".

Both serve what nanofast.ops.scaled_dot_product_attention serves and hand anything else to torch's
function with one warning per reason (the reason is the ops' own check message). transformers is never
imported here: it is found in sys.modules, where the patched model's own import put it.
"""
import importlib
import sys
import warnings

import torch
import torch.nn.functional as F

from . import ops
from .ops import checks

IMPLEMENTATION = "nanofast"
_torch_sdpa = F.scaled_dot_product_attention
_warned = set()
# attention arguments of some transformers models that nanofast's attention has no counterpart for
_TRANSFORMERS_ONLY = ("softcap", "position_bias", "s_aux", "sinks", "output_attentions")


def unsupported_reason(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    """Why nanofast cannot serve this call (the ops' check message), or None if it can."""
    try:
        checks.attention_args(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    except (TypeError, ValueError) as e:  # UnsupportedArgument is a ValueError too
        return str(e).split(": ", 1)[-1]
    return None


def sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, fallback=_torch_sdpa):
    """F.scaled_dot_product_attention on nanofast where it can, on `fallback` (torch's) elsewhere. Under
    autocast the inputs are cast to autocast's dtype first, as autocast does for torch's (a rotary
    embedding in float32 beside bfloat16 values, say)."""
    device = query.device.type
    if torch.is_autocast_enabled(device) and query.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    reason = unsupported_reason(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    if reason is None:
        if attn_mask is None and not enable_gqa:  # the arguments every version of nanofast.ops takes
            return ops.scaled_dot_product_attention(query, key, value, None, dropout_p, is_causal, scale)
        return ops.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _warn_once(reason, "torch's scaled_dot_product_attention")
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **kwargs)


def transformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers' attention-interface function (the signature of its sdpa_attention_forward): query
    (B, H, Tq, D), key and value (B, Hkv, Tk, D), the mask transformers built for "sdpa" (boolean, or
    None where causality alone says it); returns ((B, Tq, H, D), None). Grouped key/value heads are read
    in place (enable_gqa), never repeated."""
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:  # a prefill into a longer static cache, as transformers' sdpa does
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    special = [k for k in _TRANSFORMERS_ONLY if kwargs.get(k) is not None and kwargs.get(k) is not False]
    if special:
        return _eager_fallback(special[0], module, query, key, value, attention_mask, dropout, scaling, is_causal,
                               **kwargs)
    out = sdpa(query, key, value, attention_mask, dropout, is_causal, scaling, key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _eager_fallback(argument, module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    """The model's own eager attention (its module's eager_attention_forward, which takes the arguments
    transformers' sdpa refuses, Gemma 2's softcap say), given the boolean sdpa mask the "nanofast"
    implementation builds as the additive mask eager attention adds, or the causal mask sdpa would have
    applied where that mask is None. transformers' sdpa where the model has no eager function."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    reason = f"{argument} (an argument nanofast's attention does not take)"
    if eager is None:
        _warn_once(reason, "transformers' sdpa attention")
        return _transformers_module("integrations.sdpa_attention").sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            **kwargs)
    _warn_once(reason, "the model's eager attention")
    if attention_mask is None and is_causal:  # (is_causal: no cache beyond the queries' own keys)
        q_len = query.shape[2]
        attention_mask = torch.ones(1, 1, q_len, q_len, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _warn_once(reason, fallback):
    kind = reason.split(" ", 1)[0]
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"nanofast.patch: falling back to {fallback} ({reason})", stacklevel=4)


def _transformers_module(name):
    return importlib.import_module(f"transformers.{name}")


def is_transformers_model(model):
    """A transformers model whose attention goes through its attention interface."""
    config = getattr(model, "config", None)
    return ("transformers" in sys.modules and hasattr(config, "_attn_implementation")
            and callable(getattr(model, "set_attn_implementation", None)))


def use_for_transformers_model(model):
    """Make "nanofast" the model's attention implementation (registered once, with transformers' sdpa
    masks), remembering the one it had."""
    if model.config._attn_implementation == IMPLEMENTATION:
        return
    interface = _transformers_module("modeling_utils").AttentionInterface
    if IMPLEMENTATION not in interface._global_mapping:
        masks = _transformers_module("masking_utils")
        interface.register(IMPLEMENTATION, transformers_attention)
        masks.AttentionMaskInterface.register(IMPLEMENTATION, masks.sdpa_mask)
    model.__dict__["_nanofast_attn_implementation"] = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)


def restore_transformers_model(model):
    previous = model.__dict__.pop("_nanofast_attn_implementation", None)
    if previous is not None:
        model.set_attn_implementation(previous)
