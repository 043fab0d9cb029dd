"""Argument checks for both backends, with one set of limits and messages: nanofast.ops' functions and
nanofast.kernels' public functions and launchers all call these. Every error names the function, the
argument and the shapes; what a backend can do is read from its capabilities (backend.py)."""
import math

import torch

from . import cpu, cuda
from .backend import backend_of_device


class UnsupportedArgument(NotImplementedError, ValueError):
    """An argument torch's function takes that nanofast does not support yet (attn_mask, enable_gqa).
    Both a NotImplementedError and a ValueError, so callers may catch either."""


def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def served(t):
    """Whether nanofast's kernels take a floating-point tensor of t's device and dtype (the nn modules
    hand the others to torch)."""
    backend = backend_of_device(t)
    return backend is not None and t.dtype in backend.DTYPES


def check_tensor(name, t, fn, backend=None):
    """t is a tensor of a dtype the backend (default: its device's) takes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if backend is None:
        backend = backend_of_device(t)
    if backend is not None and t.dtype in backend.DTYPES:
        return  # the common case, in one lookup: this runs on every call
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {_describe(t)}")
    if backend is None:
        raise ValueError(f"{fn}: {name} is on {t.device}; nanofast runs on CPU and CUDA tensors only")
    names = ", ".join(str(d) for d in backend.DTYPES)
    raise TypeError(f"{fn}: {name} has dtype {t.dtype}, which {backend.NAME} does not support (supported: {names})")


def check_same(fn, ref_name, ref, name, t):
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must share a "
                        "dtype")
    check_same_device(fn, ref_name, ref, name, t)


def check_same_device(fn, ref_name, ref, name, t):
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def check_probability(fn, name, p, upper_inclusive=True):
    """p as a float in [0, 1] (or [0, 1) where upper_inclusive is False)."""
    p = float(p)
    if not (0.0 <= p <= 1.0 if upper_inclusive else 0.0 <= p < 1.0):
        raise ValueError(f"{fn}: {name} must be in [0, {'1]' if upper_inclusive else '1)'}, got {p}")
    return p


def check_seed(fn, seed):
    """A dropout seed as an int in [0, 2**64) (the kernels read it as an unsigned 64-bit key)."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"{fn}: seed must be in [0, 2**64), got {seed}")
    return seed


# ---- LayerNorm ----

def _param_fits(p, input, on_cpu, C):
    return p is None or (isinstance(p, torch.Tensor) and p.dtype == input.dtype and p.dim() == 1 and p.shape[0] == C
                         and (p.is_cpu if on_cpu else p.device == input.device))


def _everyday_layer_norm(input, normalized_shape, weight, bias, backend):
    """(C,) when the arguments are the everyday case, else None: a tensor of a dtype the backend
    serves, normalised over its last dimension C (an int or a 1-tuple), weight and bias each None or a
    1-D tensor of C elements, of its dtype and device. A few attribute reads, where the full checks
    below, which name what is wrong, would cost a noticeable part of a small op."""
    if not isinstance(input, torch.Tensor) or input.dim() == 0:
        return None
    C = input.shape[-1]
    if not ((type(normalized_shape) is int and normalized_shape == C)
            or (type(normalized_shape) is tuple and normalized_shape == (C,))):
        return None
    on_cpu = input.is_cpu
    if backend is None:
        backend = cpu if on_cpu else cuda if input.is_cuda else None
    if backend is None or input.dtype not in backend.DTYPES:
        return None
    return (C,) if _param_fits(weight, input, on_cpu, C) and _param_fits(bias, input, on_cpu, C) else None


def layer_norm_args(input, normalized_shape, weight, bias, eps, fn="nanofast.ops.layer_norm", backend=None):
    """Checks the arguments; returns (normalized_shape as a tuple, eps as a float)."""
    shape = _everyday_layer_norm(input, normalized_shape, weight, bias, backend)
    if shape is not None and type(eps) is float and eps >= 0.0:
        return shape, eps
    check_tensor("input", input, fn, backend)
    if backend is None:
        backend = backend_of_device(input)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    elif not isinstance(normalized_shape, tuple):
        try:
            normalized_shape = tuple(int(s) for s in normalized_shape)
        except TypeError:
            raise TypeError(f"{fn}: normalized_shape must be an int or a sequence of ints, "
                            f"got {normalized_shape!r}") from None
    k = len(normalized_shape)
    # (tuples, not torch.Size: Size comparisons go through torch.fx's symbolic sym_eq)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k:]) != normalized_shape:
        raise ValueError(f"{fn}: normalized_shape {normalized_shape} must equal the last dimensions of input, "
                         f"which has shape {tuple(input.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p, fn, backend)
        (check_same_device if backend.LAYER_NORM_PARAMS_ANY_DTYPE else check_same)(fn, "input", input, name, p)
        if tuple(p.shape) != normalized_shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(p.shape)} but normalized_shape is {normalized_shape}")
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"{fn}: eps must be a non-negative number, got {eps}")
    return normalized_shape, eps


def add_layer_norm_args(input, residual, normalized_shape, weight, bias, eps, out_dtype):
    """layer_norm_args' checks plus the residual's and out_dtype's; returns (normalized_shape, eps,
    out_dtype)."""
    fn = "nanofast.ops.add_layer_norm"
    check_tensor("input", input, fn)
    check_tensor("residual", residual, fn)
    if tuple(residual.shape) != tuple(input.shape):
        raise ValueError(f"{fn}: residual has shape {tuple(residual.shape)} but input has shape {tuple(input.shape)}; "
                         "they must match (no broadcasting)")
    check_same_device(fn, "input", input, "residual", residual)
    if torch.promote_types(input.dtype, residual.dtype) != input.dtype:
        raise TypeError(f"{fn}: residual has dtype {residual.dtype}, which would promote input's {input.dtype}; "
                        "the sum keeps input's dtype, so the residual must have it or a lower precision")
    normalized_shape, eps = layer_norm_args(input, normalized_shape, weight, bias, eps)
    if out_dtype is None:
        out_dtype = input.dtype
    elif not isinstance(out_dtype, torch.dtype) or out_dtype not in backend_of_device(input).DTYPES:
        raise TypeError(f"{fn}: out_dtype must be one of {backend_of_device(input).DTYPES} on {input.device.type}, "
                        f"got {out_dtype!r}")
    return normalized_shape, eps, out_dtype


def _check_2d(fn, name, t, backend, C=None):
    check_tensor(name, t, fn, backend)
    if t.dim() != 2:
        raise ValueError(f"{fn}: {name} must be 2-D (N, C), got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{fn}: {name} must have unit stride along its last dimension, got strides {t.stride()}")
    if C is not None and t.shape[1] != C:
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {C} columns")


def _check_param(fn, name, p, C, x, backend):
    if p is None:
        return
    check_tensor(name, p, fn, backend)
    if tuple(p.shape) != (C,):
        raise ValueError(f"{fn}: {name} must have shape ({C},), got {tuple(p.shape)}")
    check_same_device(fn, "x", x, name, p)


def layer_norm_forward_args(fn, x, weight, bias, backend):
    """The LayerNorm forward launcher's arguments (backend.py's contract)."""
    _check_2d(fn, "x", x, backend)
    for name, p in (("weight", weight), ("bias", bias)):
        _check_param(fn, name, p, x.shape[1], x, backend)


def layer_norm_backward_args(fn, dy, x, weight, mean, rstd, backend):
    """The LayerNorm backward launcher's arguments (backend.py's contract)."""
    _check_2d(fn, "x", x, backend)
    N, C = x.shape
    _check_2d(fn, "dy", dy, backend, C)
    if dy.shape[0] != N:
        raise ValueError(f"{fn}: dy has shape {tuple(dy.shape)} but x has {tuple(x.shape)}")
    check_same_device(fn, "x", x, "dy", dy)
    _check_param(fn, "weight", weight, C, x, backend)
    stats = backend.stats_dtype(x.dtype)
    for name, s in (("mean", mean), ("rstd", rstd)):
        if tuple(s.shape) != (N,) or s.dtype != stats or s.device != x.device:
            raise ValueError(f"{fn}: {name} must be {stats} of shape ({N},) on {x.device}, got {s.dtype} "
                             f"{tuple(s.shape)} on {s.device}")


# ---- linear ----

def linear_args(input, weight, bias, mixed=False, fn="nanofast.ops.linear"):
    """mixed: under bfloat16 autocast, where input, weight and bias may differ in dtype (float32 or
    bfloat16: the product rounds them all to bfloat16)."""
    check_tensor("input", input, fn)
    check_tensor("weight", weight, fn)
    (check_same_device if mixed else check_same)(fn, "input", input, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: input's last dimension must equal weight's in_features: input has shape "
                         f"{tuple(input.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, fn)
        (check_same_device if mixed else check_same)(fn, "input", input, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")


# ---- attention ----

def _check_qkv(fn, query, key, value, backend):
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, fn, backend)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
    check_same(fn, "query", query, "key", key)
    check_same(fn, "query", query, "value", value)
    if backend is None:
        backend = backend_of_device(query)
    B, NH, TQ, HS = query.shape
    HSV = value.shape[3]
    if key.shape[0] != B or key.shape[1] != NH or value.shape[0] != B or value.shape[1] != NH:
        raise ValueError(f"{fn}: query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
                         "must agree in batch and heads")
    if key.shape[3] != HS:
        raise ValueError(f"{fn}: key head_dim {key.shape[3]} must equal query head_dim {HS} "
                         f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"{fn}: value seq_len {value.shape[2]} must equal key seq_len {key.shape[2]} "
                         f"(key {tuple(key.shape)}, value {tuple(value.shape)})")
    if HSV != HS and not backend.VALUE_HEAD_DIM_MAY_DIFFER:
        raise ValueError(f"{fn}: value head_dim {HSV} must equal query head_dim {HS} on {backend.NAME} "
                         f"(query {tuple(query.shape)}, value {tuple(value.shape)})")
    if max(HS, HSV) > backend.MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head_dim must be between 0 and {backend.MAX_HEAD_DIM} on {backend.NAME}, got "
                         f"query {tuple(query.shape)} and value {tuple(value.shape)}")
    if backend.MAX_BATCH_HEADS is not None and B * NH > backend.MAX_BATCH_HEADS:
        raise ValueError(f"{fn}: batch * heads must be at most {backend.MAX_BATCH_HEADS} on {backend.NAME}, got "
                         f"{B} * {NH}")


def attention_args(query, key, value, attn_mask, dropout_p, scale, enable_gqa=False,
                   fn="nanofast.ops.scaled_dot_product_attention", backend=None):
    """Checks the arguments; returns (dropout_p, scale) as floats, scale defaulting to 1/sqrt(head_dim)."""
    if attn_mask is not None:
        shape = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
        raise UnsupportedArgument(f"{fn}: attn_mask is not supported (got {shape}); use is_causal=True for causal "
                                  "masking, or torch.nn.functional.scaled_dot_product_attention for arbitrary masks")
    if enable_gqa:
        raise UnsupportedArgument(f"{fn}: enable_gqa is not supported; repeat the key/value heads first")
    _check_qkv(fn, query, key, value, backend)
    dropout_p = check_probability(fn, "dropout_p", dropout_p)
    HS = query.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(HS) if HS > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be a finite number, got {scale}")
    return dropout_p, scale


def attention_forward_args(fn, q, k, v, dropout_p, seed, backend):
    """The attention forward launcher's arguments (backend.py's contract)."""
    _check_qkv(fn, q, k, v, backend)
    check_probability(fn, "dropout_p", dropout_p)
    check_seed(fn, seed)


def attention_backward_args(fn, dout, q, k, v, out, lse, dropout_p, seed, backend):
    """The attention backward launcher's arguments (backend.py's contract)."""
    attention_forward_args(fn, q, k, v, dropout_p, seed, backend)
    B, H, Tq, _ = q.shape
    expected = (B, H, Tq, v.shape[3])
    if tuple(dout.shape) != expected or tuple(out.shape) != expected:
        raise ValueError(f"{fn}: dout {tuple(dout.shape)} and out {tuple(out.shape)} must have shape {expected}")
    stats = backend.stats_dtype(q.dtype)
    if tuple(lse.shape) != (B, H, Tq) or lse.dtype != stats:
        raise ValueError(f"{fn}: lse must be {stats} of shape {(B, H, Tq)}, got {lse.dtype} {tuple(lse.shape)}")
    for name, t in (("dout", dout), ("out", out), ("lse", lse)):
        check_same_device(fn, "query", q, name, t)


def dropout_mask_args(fn, seed, batch, heads, q_len, k_len, p):
    """Checks dropout_mask's arguments; returns them as ints and a float."""
    p = check_probability(fn, "p", p, upper_inclusive=False)
    sizes = dict(batch=batch, heads=heads, q_len=q_len, k_len=k_len)
    for name, n in sizes.items():
        if int(n) < 0:
            raise ValueError(f"{fn}: {name} must be >= 0, got {n}")
    return check_seed(fn, seed), int(batch), int(heads), int(q_len), int(k_len), p


# ---- linear + cross-entropy ----

_REDUCTIONS = ("none", "mean", "sum")


def linear_cross_entropy_args(input, weight, target, bias, ignore_index, label_smoothing, reduction, mixed=False):
    """Checks the arguments; returns (ignore_index, label_smoothing, reduction) normalised. mixed: under
    autocast, where input, weight and bias may differ in dtype."""
    fn = "nanofast.ops.linear_cross_entropy"
    linear_args(input, weight, bias, mixed, fn)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"{fn}: target must hold class indices as torch.int64 (class probabilities are not "
                        f"supported), got {_describe(target)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{fn}: target must have input's shape without its last dimension, "
                         f"{tuple(input.shape[:-1])}: input has shape {tuple(input.shape)}, target {tuple(target.shape)}")
    check_same_device(fn, "input", input, "target", target)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    label_smoothing = check_probability(fn, "label_smoothing", label_smoothing)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return ignore_index, label_smoothing, reduction


def target_out_of_range(fn, target, row, classes, ignore_index):
    """The error for a target outside [0, classes) that is not ignore_index (an IndexError, as torch's)."""
    value = int(target.reshape(-1)[row])
    return IndexError(f"{fn}: target {value} at position {row} of target (shape {tuple(target.shape)}) is out of "
                      f"range for {classes} classes (weight's first dimension) and is not ignore_index "
                      f"({ignore_index})")
