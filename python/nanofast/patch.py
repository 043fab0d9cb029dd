"""Dropping nanofast's kernels into an existing model: nanofast.patch(model), nanofast.unpatch(model).

Modules are recognised by what they compute, not by one class name (the recognisers below), and
swapped for nanofast modules that hold the very same Parameter objects, so optimizers, tied weights
and state_dict keys stay as they were. patch() remembers what it swapped; unpatch() puts it back.

Attention is routed for the patched model only:
* Hugging Face transformers models (those with an attention implementation in their config) get
  nanofast's attention as their implementation, "nanofast" (patch_attention.py), registered with
  transformers' own AttentionInterface: nothing process-wide changes;
* other models' calls of torch.nn.functional.scaled_dot_product_attention go to nanofast while the
  patched model's forward runs on the calling thread; any other thread's calls, made in that time,
  still reach torch's.
Calls nanofast cannot serve fall back to torch's with one warning per reason.

A Hugging Face causal language model's LM head and loss run as ops.linear_cross_entropy while it trains
with labels, the logits never stored (patch_loss.py; its output's logits are None then). Its attention
modules' rotary embedding runs on ops.apply_rotary_pos_emb where transformers gives each module its own
copy of the function (with Hugging Face's `kernels` package installed: patch_rotary.py).
transformers is never imported here: a model built with it has loaded it already.
"""
import threading

import torch
import torch.nn.functional as F

from . import nn as nf_nn
from . import ops, patch_attention, patch_loss, patch_rotary

_torch_sdpa = F.scaled_dot_product_attention
_route_lock = threading.Lock()
_route_depth = 0  # patched forwards running, on all threads: the swap is in place while > 0
_thread = threading.local()  # .depth: patched forwards running on this thread


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if getattr(_thread, "depth", 0) == 0:  # another thread, while a patched model runs: not routed
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    return patch_attention.sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                fallback=_torch_sdpa)


class _RoutedForward:
    """Wraps a module's forward so that, while it runs on this thread, its calls of
    torch.nn.functional.scaled_dot_product_attention go to nanofast. A module-level class (not a
    closure) so patched models still pickle."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        global _route_depth
        with _route_lock:
            if _route_depth == 0:
                F.scaled_dot_product_attention = _routed_sdpa
            _route_depth += 1
        _thread.depth = getattr(_thread, "depth", 0) + 1
        try:
            return self.forward(*args, **kwargs)
        finally:
            _thread.depth -= 1
            with _route_lock:
                _route_depth -= 1
                if _route_depth == 0:
                    F.scaled_dot_product_attention = _torch_sdpa


# ---- recognisers: (does this module compute X?, the nanofast module holding its parameters) ----

def _is_layer_norm(m):
    return type(m) is torch.nn.LayerNorm


def _layer_norm(child):
    ln = nf_nn.LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine,
                         bias=child.bias is not None, device="meta")
    ln.weight, ln.bias = child.weight, child.bias  # the same Parameter objects: optimizers keep working
    return ln


def _is_linear(m):
    return type(m) is torch.nn.Linear


def _linear(child):
    lin = nf_nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
    lin.weight, lin.bias = child.weight, child.bias  # the same Parameter objects (tied weights stay tied)
    return lin


def _is_conv1d(m):
    """transformers' Conv1D (GPT-2's projections): x @ weight + bias with weight (in, out)."""
    w = getattr(m, "weight", None)
    return (type(m).__name__ == "Conv1D" and isinstance(w, torch.nn.Parameter) and w.dim() == 2
            and getattr(m, "nf", None) == w.shape[1])


def _conv1d(child):
    conv = nf_nn.Conv1D(child.weight.shape[1], child.weight.shape[0], device="meta")
    conv.weight, conv.bias = child.weight, child.bias
    return conv


def _is_rms_norm(m):
    """torch.nn.RMSNorm, and the RMSNorm modules of transformers' models: a 1-D weight and an epsilon
    (variance_epsilon: Llama, Qwen2, Mistral...; eps: Gemma's, which scales by (1 + weight))."""
    if type(m) is torch.nn.RMSNorm:
        return True
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.nn.Parameter) and w.dim() == 1
            and (hasattr(m, "variance_epsilon") or hasattr(m, "eps")) and not list(m.children()))


def _rms_norm(child):
    if type(child) is torch.nn.RMSNorm:
        norm = nf_nn.RMSNorm(child.normalized_shape, child.eps, child.elementwise_affine, device="meta")
    elif hasattr(child, "variance_epsilon"):  # Llama's: the normalised rows rounded to the input's dtype first
        norm = nf_nn.RMSNorm(child.weight.shape, child.variance_epsilon, device="meta", cast_before_weight=True)
    else:  # Gemma's: x * rsqrt(mean(x^2) + eps) * (1 + weight) in float32, rounded once
        norm = nf_nn.RMSNorm(child.weight.shape, child.eps, device="meta", weight_offset=1.0)
    norm.weight = child.weight
    return norm


_GELU_APPROXIMATION = {"GELUActivation": "none", "NewGELUActivation": "tanh", "GELUTanh": "tanh",
                       "PytorchGELUTanh": "tanh"}  # transformers' activation classes


def _is_gelu(m):
    return (type(m) is torch.nn.GELU or type(m).__name__ in _GELU_APPROXIMATION) and not list(m.parameters())


def _gelu(child):
    if type(child) is torch.nn.GELU:
        return nf_nn.GELU(child.approximate)
    return nf_nn.GELU(_GELU_APPROXIMATION[type(child).__name__])


# In the order they are tried; patch()'s keyword arguments name the kinds.
_RECOGNISERS = [
    ("layer_norm", _is_layer_norm, _layer_norm),
    ("linear", _is_linear, _linear),
    ("linear", _is_conv1d, _conv1d),
    ("rms_norm", _is_rms_norm, _rms_norm),
    ("activation", _is_gelu, _gelu),
]


def _gated_activation(m):
    """The gated MLP a module computes, down_proj(act(gate_proj(x)) * up_proj(x)) (Llama, Qwen2, Mistral,
    Gemma...), as the activation's name for nanofast.ops' gated kernels; None for other modules."""
    if not all(isinstance(getattr(m, n, None), torch.nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    act = getattr(m, "act_fn", None)
    name = type(act).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    if name in _GELU_APPROXIMATION or isinstance(act, torch.nn.GELU):
        approximate = getattr(act, "approximate", None) or _GELU_APPROXIMATION.get(name, "none")
        return "gelu" if approximate == "none" else "gelu_tanh"
    return None


class _GatedMLPForward:
    """A gated MLP's forward with the gate's activation and the product in one nanofast kernel, forward
    and backward (nanofast.ops.swiglu / geglu). A module-level class, so that patched models pickle."""

    def __init__(self, module, activation):
        self.module, self.activation = module, activation

    def __call__(self, x):
        m = self.module
        gate, up = m.gate_proj(x), m.up_proj(x)
        if self.activation == "silu":
            h = ops.swiglu(gate, up)
        else:
            h = ops.geglu(gate, up, approximate="none" if self.activation == "gelu" else "tanh")
        return m.down_proj(h)


def _route_gated_mlps(model, forwards):
    for name, m in model.named_modules():
        activation = _gated_activation(m)
        if activation is not None and not isinstance(m.__dict__.get("forward"), _GatedMLPForward):
            m.forward = _GatedMLPForward(m, activation)
            forwards.append(name)


def _swap(module, kinds, swapped, prefix="", seen=None):
    """Replaces, in place, each submodule a recogniser of an enabled kind claims (exact types: subclasses
    such as adapters keep their own forward), recording the original under its qualified name. A module
    held under several names gets one replacement under all of them (named_children would yield only
    its first name)."""
    seen = {} if seen is None else seen  # id(original) -> its replacement, or None where none claimed it
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        qualified = f"{prefix}{name}"
        if id(child) not in seen:
            seen[id(child)] = next((build(child) for kind, claims, build in _RECOGNISERS
                                    if kind in kinds and claims(child)), None)
            if seen[id(child)] is None:
                _swap(child, kinds, swapped, qualified + ".", seen)
        if seen[id(child)] is not None:
            setattr(module, name, seen[id(child)])
            swapped[qualified] = child


def patch(model: torch.nn.Module, layer_norm: bool = True, attention: bool = True, linear: bool = True,
          rms_norm: bool = True, mlp: bool = True, fused_loss: bool = True, rotary: bool = True) -> torch.nn.Module:
    """Make `model` run nanofast's kernels, in place, and return it (nanofast.unpatch undoes it).

    layer_norm: replace torch.nn.LayerNorm submodules by nanofast.nn.LayerNorm, keeping the parameters.
    attention: route the model's attention to nanofast.ops (see the module docstring); calls nanofast
    cannot serve go to torch, with one warning per reason.
    linear: replace torch.nn.Linear and transformers' Conv1D submodules by nanofast.nn.Linear /
    nanofast.nn.Conv1D (nanofast's GEMMs where the CPU has them), keeping the parameters.
    rms_norm: replace torch.nn.RMSNorm and transformers' RMSNorm modules (Llama's, Gemma's roundings) by
    nanofast.nn.RMSNorm, keeping the weight.
    mlp: run gated MLPs (gate_proj, up_proj, down_proj with a SiLU or GELU act_fn) with the activation
    and product fused (ops.swiglu / ops.geglu), and GELU activation modules (torch's, transformers'
    exact and tanh forms) on nanofast.ops.gelu.
    fused_loss: in a Hugging Face causal language model (an lm_head Linear whose logits go unchanged to
    transformers' causal-LM loss), compute the head and the loss as ops.linear_cross_entropy whenever
    the model trains (model.training, grad mode on) with labels, so the (batch * length, vocab) logits
    are never stored; the output's logits are None then. Without labels, under no_grad or in eval mode
    the logits are computed as before.
    rotary: run transformers' apply_rotary_pos_emb on nanofast.ops.apply_rotary_pos_emb in this model's
    attention modules, where each has its own copy of the function (transformers does that when
    Hugging Face's `kernels` package is installed; without it the function stays transformers').
    """
    kinds = {k for k, on in (("layer_norm", layer_norm), ("linear", linear), ("rms_norm", rms_norm),
                             ("activation", mlp)) if on}
    swapped = model.__dict__.setdefault("_nanofast_swapped", {})
    _swap(model, kinds, swapped)
    if mlp:
        _route_gated_mlps(model, model.__dict__.setdefault("_nanofast_forwards", []))
    if fused_loss:
        patch_loss.use_for_transformers_model(model)
    if rotary:
        patch_rotary.route(model)
    if attention:
        if patch_attention.is_transformers_model(model):
            patch_attention.use_for_transformers_model(model)
        elif not isinstance(model.forward, _RoutedForward):
            model.forward = _RoutedForward(model.forward)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo nanofast.patch(model), in place: the original modules (which share the parameters the run
    has trained) and attention as it was."""
    for qualified, original in model.__dict__.pop("_nanofast_swapped", {}).items():
        parent_name, _, name = qualified.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, name, original)
    for name in model.__dict__.pop("_nanofast_forwards", []):
        model.get_submodule(name).__dict__.pop("forward", None)
    patch_loss.restore_transformers_model(model)
    patch_rotary.restore(model)
    if isinstance(model.__dict__.get("forward"), _RoutedForward):
        del model.forward  # the instance attribute; the class's forward shows through again
    patch_attention.restore_transformers_model(model)
    return model
