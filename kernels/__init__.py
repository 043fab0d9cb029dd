"""nanofast.kernels: the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

Two layers:

* Launchers, no autograd, plain tensors in and out: ``layer_norm_forward``, ``layer_norm_backward``,
  ``rms_norm_forward``, ``rms_norm_backward`` (with an optional residual add), ``glu_forward``,
  ``glu_backward`` (the gated MLP's activation), ``rotary_forward``, ``rotary_backward``,
  ``attention_forward``, ``attention_backward``, and ``dropout_mask`` (the attention-dropout mask,
  from the attention kernels' own helper). Each checks its arguments (nanofast.ops.checks) and runs
  the submodule's launcher, which nanofast.ops' CUDA backend calls directly, its arguments checked.
* Autograd-capable functions with torch's (or nanofast.ops') signatures: ``layer_norm``, ``rms_norm``,
  ``swiglu``, ``geglu``, ``apply_rotary_pos_emb`` and ``scaled_dot_product_attention``: nanofast.ops'
  autograd formulas with the Triton launchers.

Importing this package needs neither triton nor a GPU: triton is imported by the submodules, which
load on first use. Without triton, ``HAS_TRITON`` is False and every function raises RuntimeError.
Set TRITON_INTERPRET=1 before the first use to run the kernels on CPU tensors.
"""
import importlib
import importlib.util


def _has_triton():
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked triton install
        return False


HAS_TRITON = _has_triton()

__all__ = [
    "HAS_TRITON",
    "layer_norm", "rms_norm", "swiglu", "geglu", "apply_rotary_pos_emb", "scaled_dot_product_attention",
    "layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward",
    "glu_forward", "glu_backward", "rotary_forward", "rotary_backward",
    "attention_forward", "attention_backward", "dropout_mask",
]


def submodule(name):
    """The submodule ``name`` (``layernorm``, ``rmsnorm``, ``attention``, ...: the launchers without argument
    checks, which nanofast.ops' CUDA backend calls), imported on first use (it imports triton)."""
    if not HAS_TRITON:
        raise RuntimeError(
            "nanofast.kernels needs triton, which is not installed (pip install 'nanofast[triton]' or "
            "pip install triton); on CPU tensors use nanofast.ops, which runs the C++ kernels")
    return importlib.import_module(f"{__name__}.{name}")


# --------------------------------------------------------------------------------------------------
# Launchers (no autograd): the checks, then the submodules' launchers
# --------------------------------------------------------------------------------------------------

def _triton_backend():
    """nanofast.ops' CUDA backend (the Triton launchers); imported here, not at the top, so that this
    package imports on its own."""
    submodule("layernorm")  # the clear error without triton, before any argument check
    from nanofast.ops import cuda
    return cuda


def _checks():
    from nanofast.ops import checks
    return checks


def layer_norm_forward(x2d, weight, bias, eps, **kwargs):
    """(y, mean, rstd) for x2d (N, C) with unit column stride; weight/bias (C,) or None.

    y: (N, C) contiguous, x2d's dtype; mean, rstd: (N,) float32 contiguous.
    """
    _checks().layer_norm_forward_args("nanofast.kernels.layer_norm_forward", x2d, weight, bias, _triton_backend())
    return submodule("layernorm").layer_norm_forward(x2d, weight, bias, eps, **kwargs)


def layer_norm_backward(dy2d, x2d, weight, mean, rstd, need_weight_grad, need_bias_grad, **kwargs):
    """(dx, dw or None, db or None). dx: (N, C) contiguous, x2d's dtype; dw, db: (C,), the weight's
    dtype (x2d's dtype without a weight). Deterministic (no atomics)."""
    _checks().layer_norm_backward_args("nanofast.kernels.layer_norm_backward", dy2d, x2d, weight, mean, rstd,
                                       _triton_backend())
    return submodule("layernorm").layer_norm_backward(
        dy2d, x2d, weight, mean, rstd, need_weight_grad, need_bias_grad, **kwargs)


def rms_norm_forward(x, residual, weight, eps, weight_offset=0.0, cast_before_weight=False, out_dtype=None,
                     **kwargs):
    """(h, y, rstd) for x (..., C) with unit column stride: h = x + residual (empty (0,) when residual
    is None), y = h * rstd * (weight + weight_offset) in out_dtype (default x's), both contiguous in
    x's shape; rstd (N,) float32. cast_before_weight rounds h * rstd to x's dtype first (Hugging Face's
    LlamaRMSNorm)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _checks().rms_norm_forward_args("nanofast.kernels.rms_norm_forward", x, residual, weight, out_dtype,
                                    _triton_backend())
    return submodule("rmsnorm").rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight,
                                                 out_dtype, **kwargs)


def rms_norm_backward(dy, dh, x, weight, rstd, weight_offset=0.0, cast_before_weight=False, residual_dtype=None,
                      need_weight_grad=True, **kwargs):
    """(dx, dresidual, dweight): x is the forward's x, or its h where it had a residual of
    residual_dtype; dresidual is empty without a residual or where it has x's dtype (it equals dx),
    dweight where not needed. Deterministic (no atomics)."""
    _checks().rms_norm_backward_args("nanofast.kernels.rms_norm_backward", dy, dh, x, weight, rstd, residual_dtype,
                                     _triton_backend())
    return submodule("rmsnorm").rms_norm_backward(dy, dh, x, weight, rstd, weight_offset, cast_before_weight,
                                                  residual_dtype, need_weight_grad, **kwargs)


def glu_forward(gate, up, activation, **kwargs):
    """act(gate) * up for gate and up of one shape (unit last stride, any row strides): activation
    "silu" (SwiGLU), "gelu" or "gelu_tanh" (GEGLU). The result is contiguous in gate's shape."""
    _checks().glu_args("nanofast.kernels.glu_forward", gate, up, activation, _triton_backend(), launcher=True)
    return submodule("glu").glu_forward(gate, up, activation, **kwargs)


def glu_backward(dy, gate, up, activation, **kwargs):
    """(dgate, dup) = (dy * up * act'(gate), dy * act(gate)), contiguous in gate's shape."""
    _checks().glu_args("nanofast.kernels.glu_backward", gate, up, activation, _triton_backend(), dy, launcher=True)
    return submodule("glu").glu_backward(dy, gate, up, activation, **kwargs)


def rotary_forward(q, k, cos, sin, interleaved=False, **kwargs):
    """(q_embed, k_embed): x * cos + rotate(x) * sin over the first cos.shape[-1] columns of q and k (up
    to 4 dims, unit last stride), the others copied; cos and sin have q's number of dims and broadcast
    over each one's leading dims. The results have the dtype q's and cos's promote to and q's and k's
    layouts where those are dense."""
    _checks().rotary_launcher_args("nanofast.kernels.rotary_forward", q, k, cos, sin, _triton_backend())
    return submodule("rope").rotary_forward(q, k, cos, sin, interleaved, **kwargs)


def rotary_backward(dq, dk, cos, sin, interleaved=False, dtype=None, **kwargs):
    """(dq, dk): the transposed rotation of the outputs' gradients, in dtype (default: theirs); either may
    be None (an empty (0,) result)."""
    _checks().rotary_launcher_args("nanofast.kernels.rotary_backward", dq, dk, cos, sin, _triton_backend(),
                                   backward=True)
    dtype = (dq if dq is not None else dk).dtype if dtype is None else dtype
    return submodule("rope").rotary_backward(dq, dk, cos, sin, interleaved, dtype, **kwargs)


def attention_forward(q, k, v, is_causal, scale, dropout_p=0.0, seed=0, attn_mask=None, window=0, **kwargs):
    """(out, lse) for q (B, H, Tq, D), k and v (B, Hkv, Tk, D) (Hkv dividing H), any strides.

    out: (B, H, Tq, D), q's dtype, laid out as (B, Tq, H, D) (a transpose(1, 2) view);
    lse: (B, H, Tq) float32 contiguous, natural log (+inf for a query that sees no key). attn_mask:
    None, bool or additive, broadcastable to (B, H, Tq, Tk); window: 0, or with is_causal the sliding
    window. Keyword ``tf32=True`` allows TF32 dots for float32 inputs (default: the NANOFAST_TF32=1
    environment variable, else IEEE float32).
    """
    _checks().attention_forward_args("nanofast.kernels.attention_forward", q, k, v, dropout_p, seed,
                                     _triton_backend(), attn_mask, window, is_causal)
    return submodule("attention").attention_forward(q, k, v, is_causal, scale, dropout_p, seed, attn_mask, window,
                                                    **kwargs)


def attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p=0.0, seed=0, attn_mask=None, window=0,
                       **kwargs):
    """(dq, dk, dv), each with its input's shape and dtype, in its input's layout where that is dense with a
    unit last stride, else laid out as (B, T, H, D); dk and dv summed over each key/value head's query
    heads. Deterministic."""
    _checks().attention_backward_args("nanofast.kernels.attention_backward", dout, q, k, v, out, lse, dropout_p,
                                      seed, _triton_backend(), attn_mask, window, is_causal)
    return submodule("attention").attention_backward(
        dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed, attn_mask, window, **kwargs)


def dropout_mask(seed, batch, heads, q_len, k_len, p, **kwargs):
    """bool (batch, heads, q_len, k_len), True where attention dropout keeps the element."""
    args = _checks().dropout_mask_args("nanofast.kernels.dropout_mask", seed, batch, heads, q_len, k_len, p)
    return submodule("attention").dropout_mask(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# User-facing functions: nanofast.ops' checks and autograd formulas, with the Triton launchers
# --------------------------------------------------------------------------------------------------

def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """torch.nn.functional.layer_norm on the Triton kernels (autograd-capable)."""
    from nanofast.ops.layer_norm import layer_norm_on
    return layer_norm_on(_triton_backend(), "nanofast.kernels.layer_norm", input, normalized_shape, weight, bias, eps)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, weight_offset=0.0, cast_before_weight=False):
    """torch.nn.functional.rms_norm on the Triton kernels (autograd-capable), with nanofast.ops.rms_norm's
    weight_offset and cast_before_weight."""
    from nanofast.ops.rms_norm import rms_norm_on
    return rms_norm_on(_triton_backend(), "nanofast.kernels.rms_norm", input, normalized_shape, weight, eps,
                       weight_offset, cast_before_weight)


def swiglu(gate, up):
    """nanofast.ops.swiglu (F.silu(gate) * up) on the Triton kernel (autograd-capable)."""
    from nanofast.ops.glu import glu_on
    return glu_on(_triton_backend(), "nanofast.kernels.swiglu", gate, up, "silu")


def geglu(gate, up, approximate="none"):
    """nanofast.ops.geglu (F.gelu(gate, approximate=approximate) * up) on the Triton kernel."""
    from nanofast.ops.checks import check_approximate
    from nanofast.ops.glu import glu_on
    check_approximate("nanofast.kernels.geglu", approximate)
    return glu_on(_triton_backend(), "nanofast.kernels.geglu", gate, up, "gelu" if approximate == "none" else "gelu_tanh")


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, *, interleaved=False):
    """nanofast.ops.apply_rotary_pos_emb (Hugging Face's function) on the Triton kernel."""
    from nanofast.ops.rotary import rotary_on
    return rotary_on(_triton_backend(), "nanofast.kernels.apply_rotary_pos_emb", q, k, cos, sin, unsqueeze_dim,
                     interleaved)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, window=None):
    """torch.nn.functional.scaled_dot_product_attention on the Triton flash-attention kernels.

    Inputs (B, H, T, D), strided views allowed; causal is top-left aligned (key j visible to query i
    iff j <= i). attn_mask, enable_gqa and window as nanofast.ops.scaled_dot_product_attention takes
    them. Dropout uses a seed drawn from torch's CPU generator, so torch.manual_seed makes it
    reproducible and the mask equals nanofast.ops.dropout_mask for that seed. The result is a
    (B, H, Tq, D) view of a (B, Tq, H, D) buffer.
    """
    from nanofast.ops.attention import attention_on
    return attention_on(_triton_backend(), "nanofast.kernels.scaled_dot_product_attention", query, key, value,
                        attn_mask, dropout_p, is_causal, scale, enable_gqa, window)
