"""Argument checks shared by the CPU and CUDA paths: every error names the argument and the shapes."""
import math

import torch

MAX_HEAD_DIM_CPU = 256
MAX_HEAD_DIM_CUDA = 128
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


_SUPPORTED = {"cpu": CPU_DTYPES, "cuda": CUDA_DTYPES}


def served(t):
    """Whether nanofast's kernels take a floating-point tensor of t's device and dtype (the nn modules
    hand the others to torch)."""
    return t.dtype in _SUPPORTED.get(t.device.type, ())


def check_tensor(name, t, fn):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    supported = _SUPPORTED.get(t.device.type)
    if supported is not None and t.dtype in supported:
        return  # the common case, in one lookup: this runs on every call
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {_describe(t)}")
    if supported is None:
        raise ValueError(f"{fn}: {name} is on {t.device}; nanofast runs on CPU and CUDA tensors only")
    names = ", ".join(str(d) for d in supported)
    raise TypeError(f"{fn}: {name} has dtype {t.dtype}, which nanofast does not support on {t.device.type} "
                    f"(supported: {names})")


def check_same(fn, ref_name, ref, name, t):
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def _param_fits(p, input, on_cpu, C):
    return p is None or (isinstance(p, torch.Tensor) and p.dtype == input.dtype and p.dim() == 1 and p.shape[0] == C
                         and (p.is_cpu if on_cpu else p.device == input.device))


def _everyday_layer_norm(input, normalized_shape, weight, bias):
    """(C,) when the arguments are the everyday case, else None: a tensor of a dtype its device serves,
    normalised over its last dimension C (an int or a 1-tuple), weight and bias each None or a 1-D
    tensor of C elements, of its dtype and device. A few attribute reads: the full checks below, which
    name what is wrong, cost about 3 µs, a tenth of the op at nanoGPT's CPU shapes."""
    if not isinstance(input, torch.Tensor) or input.dim() == 0:
        return None
    C = input.shape[-1]
    if not ((type(normalized_shape) is int and normalized_shape == C)
            or (type(normalized_shape) is tuple and normalized_shape == (C,))):
        return None
    on_cpu = input.is_cpu
    if input.dtype not in (CPU_DTYPES if on_cpu else CUDA_DTYPES if input.is_cuda else ()):
        return None
    return (C,) if _param_fits(weight, input, on_cpu, C) and _param_fits(bias, input, on_cpu, C) else None


def layer_norm_args(input, normalized_shape, weight, bias, eps):
    """Checks the arguments; returns (normalized_shape as a tuple, eps as a float)."""
    shape = _everyday_layer_norm(input, normalized_shape, weight, bias)
    if shape is not None and type(eps) is float and eps >= 0.0:
        return shape, eps
    fn = "nanofast.ops.layer_norm"
    check_tensor("input", input, fn)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    elif not isinstance(normalized_shape, tuple):
        try:
            normalized_shape = tuple(int(s) for s in normalized_shape)
        except TypeError:
            raise TypeError(f"{fn}: normalized_shape must be an int or a sequence of ints, "
                            f"got {normalized_shape!r}") from None
    k = len(normalized_shape)
    # (tuples, not torch.Size: Size comparisons go through torch.fx's symbolic sym_eq, 1 µs each)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k:]) != normalized_shape:
        raise ValueError(f"{fn}: normalized_shape {normalized_shape} must equal the last dimensions of input, "
                         f"which has shape {tuple(input.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p, fn)
        check_same(fn, "input", input, name, p)
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
    if residual.device != input.device:
        raise ValueError(f"{fn}: residual is on {residual.device} but input is on {input.device}; they must match")
    if torch.promote_types(input.dtype, residual.dtype) != input.dtype:
        raise TypeError(f"{fn}: residual has dtype {residual.dtype}, which would promote input's {input.dtype}; "
                        "the sum keeps input's dtype, so the residual must have it or a lower precision")
    normalized_shape, eps = layer_norm_args(input, normalized_shape, weight, bias, eps)
    if out_dtype is None:
        out_dtype = input.dtype
    elif not isinstance(out_dtype, torch.dtype) or out_dtype not in _SUPPORTED.get(input.device.type, ()):
        raise TypeError(f"{fn}: out_dtype must be one of {_SUPPORTED.get(input.device.type)} on {input.device.type}, "
                        f"got {out_dtype!r}")
    return normalized_shape, eps, out_dtype


def linear_args(input, weight, bias, mixed=False):
    """mixed: under bfloat16 autocast, where input, weight and bias may differ in dtype (float32 or
    bfloat16: the product rounds them all to bfloat16)."""
    fn = "nanofast.ops.linear"
    check_tensor("input", input, fn)
    check_tensor("weight", weight, fn)
    if not mixed:
        check_same(fn, "input", input, "weight", weight)
    elif weight.device != input.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but input is on {input.device}; they must match")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: input's last dimension must equal weight's in_features: input has shape "
                         f"{tuple(input.shape)}, weight {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, fn)
        if not mixed:
            check_same(fn, "input", input, "bias", bias)
        elif bias.device != input.device:
            raise ValueError(f"{fn}: bias is on {bias.device} but input is on {input.device}; they must match")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")


def attention_args(query, key, value, attn_mask, dropout_p, scale, enable_gqa=False):
    fn = "nanofast.ops.scaled_dot_product_attention"
    if attn_mask is not None:
        shape = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
        raise NotImplementedError(f"{fn}: attn_mask is not supported (got {shape}); use is_causal=True for causal "
                                  "masking, or torch.nn.functional.scaled_dot_product_attention for arbitrary masks")
    if enable_gqa:
        raise NotImplementedError(f"{fn}: enable_gqa is not supported; repeat the key/value heads first")
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, fn)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
    check_same(fn, "query", query, "key", key)
    check_same(fn, "query", query, "value", value)
    B, NH, TQ, HS = query.shape
    if key.shape[0] != B or key.shape[1] != NH or value.shape[0] != B or value.shape[1] != NH:
        raise ValueError(f"{fn}: query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
                         "must agree in batch and heads")
    if key.shape[3] != HS:
        raise ValueError(f"{fn}: key head_dim {key.shape[3]} must equal query head_dim {HS} "
                         f"(query {tuple(query.shape)}, key {tuple(key.shape)})")
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"{fn}: value seq_len {value.shape[2]} must equal key seq_len {key.shape[2]} "
                         f"(key {tuple(key.shape)}, value {tuple(value.shape)})")
    limit = MAX_HEAD_DIM_CUDA if query.device.type == "cuda" else MAX_HEAD_DIM_CPU
    if max(HS, value.shape[3]) > limit:
        raise ValueError(f"{fn}: head_dim up to {limit} is supported on {query.device.type}, got query "
                         f"{tuple(query.shape)} and value {tuple(value.shape)}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(HS) if HS > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be a finite number, got {scale}")
    return dropout_p, scale


def unit_last_stride(t):
    """Kernels need the last dimension packed; other strides are free."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()
