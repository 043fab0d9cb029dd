"""Argument checks for both backends, with one set of limits and messages: nanofast.ops' functions and
nanofast.kernels' public functions and launchers all call these. Every error names the function, the
argument and the shapes; what a backend can do is read from its capabilities (backend.py)."""
import math

import torch

from . import cpu, cuda
from .backend import backend_of_device


class UnsupportedArgument(NotImplementedError, ValueError):
    """An argument torch's function takes that nanofast does not support yet (an attn_mask that
    requires grad). Both a NotImplementedError and a ValueError, so callers may catch either."""


def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def served(t):
    """Whether nanofast's kernels take a floating-point tensor of t's device and dtype (the nn modules
    hand the others to torch)."""
    backend = backend_of_device(t)
    return backend is not None and t.dtype in backend.DTYPES


def layer_norm_served(input, weight, bias):
    """served(input), with parameters whose dtype the backend's LayerNorm takes beside it (under CPU
    autocast a float32 LayerNorm sees bfloat16 rows: torch's then)."""
    if not served(input):
        return False
    backend = backend_of_device(input)
    return backend.LAYER_NORM_PARAMS_ANY_DTYPE or all(p is None or p.dtype == input.dtype for p in (weight, bias))


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


def check_approximate(fn, approximate):
    """GELU's approximate: 'none' (the erf form) or 'tanh', as torch.nn.functional.gelu takes it."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{fn}: approximate must be 'none' or 'tanh', got {approximate!r}")


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
    normalized_shape = _normalized_shape(fn, input, normalized_shape)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p, fn, backend)
        (check_same_device if backend.LAYER_NORM_PARAMS_ANY_DTYPE else check_same)(fn, "input", input, name, p)
        if tuple(p.shape) != normalized_shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(p.shape)} but normalized_shape is {normalized_shape}")
    return normalized_shape, _eps(fn, eps)


def _normalized_shape(fn, input, normalized_shape):
    """normalized_shape as a tuple of ints that equals input's last dimensions."""
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
    return normalized_shape


def _eps(fn, eps):
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"{fn}: eps must be a non-negative number, got {eps}")
    return eps


def _check_residual(fn, input, residual):
    check_tensor("input", input, fn)
    check_tensor("residual", residual, fn)
    if tuple(residual.shape) != tuple(input.shape):
        raise ValueError(f"{fn}: residual has shape {tuple(residual.shape)} but input has shape {tuple(input.shape)}; "
                         "they must match (no broadcasting)")
    check_same_device(fn, "input", input, "residual", residual)
    if torch.promote_types(input.dtype, residual.dtype) != input.dtype:
        raise TypeError(f"{fn}: residual has dtype {residual.dtype}, which would promote input's {input.dtype}; "
                        "the sum keeps input's dtype, so the residual must have it or a lower precision")


def _out_dtype(fn, input, out_dtype):
    """out_dtype, input's dtype where it is None."""
    if out_dtype is None:
        return input.dtype
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in backend_of_device(input).DTYPES:
        raise TypeError(f"{fn}: out_dtype must be one of {backend_of_device(input).DTYPES} on {input.device.type}, "
                        f"got {out_dtype!r}")
    return out_dtype


def add_layer_norm_args(input, residual, normalized_shape, weight, bias, eps, out_dtype):
    """layer_norm_args' checks plus the residual's and out_dtype's; returns (normalized_shape, eps,
    out_dtype)."""
    fn = "nanofast.ops.add_layer_norm"
    _check_residual(fn, input, residual)
    normalized_shape, eps = layer_norm_args(input, normalized_shape, weight, bias, eps)
    return normalized_shape, eps, _out_dtype(fn, input, out_dtype)


# ---- RMSNorm ----

def rms_norm_args(input, normalized_shape, weight, eps, weight_offset, fn="nanofast.ops.rms_norm", backend=None):
    """Checks the arguments; returns (normalized_shape as a tuple, eps, weight_offset) as floats, eps
    defaulting to torch.nn.functional.rms_norm's (the machine epsilon of the statistic's dtype)."""
    shape = _everyday_layer_norm(input, normalized_shape, weight, None, backend)
    if shape is None:
        check_tensor("input", input, fn, backend)
        shape = _normalized_shape(fn, input, normalized_shape)
        if weight is not None:
            check_tensor("weight", weight, fn, backend)
            check_same(fn, "input", input, "weight", weight)
            if tuple(weight.shape) != shape:
                raise ValueError(f"{fn}: weight has shape {tuple(weight.shape)} but normalized_shape is {shape}")
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    weight_offset = float(weight_offset)
    if not math.isfinite(weight_offset):
        raise ValueError(f"{fn}: weight_offset must be a finite number, got {weight_offset}")
    return shape, _eps(fn, eps), weight_offset


def add_rms_norm_args(input, residual, normalized_shape, weight, eps, weight_offset, out_dtype):
    """rms_norm_args' checks plus the residual's and out_dtype's; returns (normalized_shape, eps,
    weight_offset, out_dtype)."""
    fn = "nanofast.ops.add_rms_norm"
    _check_residual(fn, input, residual)
    return *rms_norm_args(input, normalized_shape, weight, eps, weight_offset, fn), _out_dtype(fn, input, out_dtype)


def _check_rows(fn, name, t, backend, shape=None):
    check_tensor(name, t, fn, backend)
    if t.dim() == 0 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        raise ValueError(f"{fn}: {name} must have a last dimension of unit stride, got shape {tuple(t.shape)} and "
                         f"strides {t.stride()}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {shape}")


def rms_norm_forward_args(fn, x, residual, weight, out_dtype, backend):
    """The RMSNorm forward launcher's arguments (backend.py's contract)."""
    _check_rows(fn, "x", x, backend)
    if residual is not None:
        _check_rows(fn, "residual", residual, backend, tuple(x.shape))
        check_same_device(fn, "x", x, "residual", residual)
    elif out_dtype != x.dtype:
        raise TypeError(f"{fn}: out_dtype {out_dtype} must be x's dtype {x.dtype} without a residual")
    if weight is not None:
        _check_param(fn, "weight", weight, x.shape[-1], x, backend)


def rms_norm_backward_args(fn, dy, dh, x, weight, rstd, residual_dtype, backend):
    """The RMSNorm backward launcher's arguments (backend.py's contract)."""
    _check_rows(fn, "x", x, backend)
    _check_rows(fn, "dy", dy, backend, tuple(x.shape))
    check_same_device(fn, "x", x, "dy", dy)
    if dh is not None:
        if residual_dtype is None:
            raise ValueError(f"{fn}: dh (h's gradient) is given but residual_dtype is None (no residual)")
        _check_rows(fn, "dh", dh, backend, tuple(x.shape))
        check_same(fn, "x", x, "dh", dh)
    if weight is not None:
        _check_param(fn, "weight", weight, x.shape[-1], x, backend)
    N = math.prod(x.shape[:-1])
    stats = backend.stats_dtype(x.dtype)
    if tuple(rstd.shape) != (N,) or rstd.dtype != stats or rstd.device != x.device:
        raise ValueError(f"{fn}: rstd must be {stats} of shape ({N},) on {x.device}, got {rstd.dtype} "
                         f"{tuple(rstd.shape)} on {rstd.device}")


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


# ---- gated MLP activations ----

def glu_args(fn, gate, up, activation, backend=None, dy=None, launcher=False):
    """gate and up (and the backward's dy): one shape, dtype and device, and for a launcher (launcher
    True) a unit last stride (the ops pack the others); activation one of the kernels'."""
    if activation not in ("silu", "gelu", "gelu_tanh"):
        raise ValueError(f"{fn}: activation must be 'silu', 'gelu' or 'gelu_tanh', got {activation!r}")
    check_tensor("gate", gate, fn, backend)
    check_tensor("up", up, fn, backend)
    check_same(fn, "gate", gate, "up", up)
    if tuple(up.shape) != tuple(gate.shape):
        raise ValueError(f"{fn}: up has shape {tuple(up.shape)} but gate has shape {tuple(gate.shape)}; they must "
                         "match (no broadcasting)")
    if gate.dim() == 0:
        raise ValueError(f"{fn}: gate and up must have at least one dimension, got shape ()")
    if dy is not None:
        check_tensor("dy", dy, fn, backend)
        check_same(fn, "gate", gate, "dy", dy)
        if tuple(dy.shape) != tuple(gate.shape):
            raise ValueError(f"{fn}: dy has shape {tuple(dy.shape)} but gate has shape {tuple(gate.shape)}")
    if launcher:
        for name, t in (("gate", gate), ("up", up)):
            _check_rows(fn, name, t, backend)


# ---- rotary position embedding ----

def _rotary_tensors(fn, q, k, cos, sin, backend, cos_name="cos"):
    """q and k of one dtype, device, number of dims (1 to 4) and head dim D; cos and sin of one shape and
    dtype (q's, or float32 beside 16-bit q and k), an even last dim R of at most D, and q's number of
    dims, broadcasting over the leading dims of q and of k without enlarging them. cos_name: what to
    call cos in messages."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_tensor(name, t, fn, backend)
    check_same(fn, "q", q, "k", k)
    check_same(fn, "cos", cos, "sin", sin)
    check_same_device(fn, "q", q, "cos", cos)
    if tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"{fn}: sin has shape {tuple(sin.shape)} but cos has shape {tuple(cos.shape)}")
    if not 1 <= q.dim() <= 4 or k.dim() != q.dim():
        raise ValueError(f"{fn}: q and k must have 1 to 4 dims, the same number, got q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}")
    D, R = q.shape[-1], cos.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"{fn}: k's head dim must equal q's, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if R % 2 or R > D:
        raise ValueError(f"{fn}: cos and sin must have an even last dim of at most q's head dim {D}, got "
                         f"{cos_name} {tuple(cos.shape)}")
    if cos.dtype != q.dtype and not (cos.dtype == torch.float32 and q.dtype in (torch.bfloat16, torch.float16)):
        raise TypeError(f"{fn}: cos has dtype {cos.dtype} but q has dtype {q.dtype}; cos and sin must have q's dtype, "
                        "or float32 beside 16-bit q and k")
    for name, t in (("q", q), ("k", k)):
        lead = tuple(t.shape[:-1])
        if cos.dim() != t.dim() or any(c not in (1, n) for c, n in zip(cos.shape[:-1], lead)):
            raise ValueError(f"{fn}: {cos_name} {tuple(cos.shape)} does not broadcast over {name}'s leading dims: "
                             f"{name} has shape {tuple(t.shape)}")


def rotary_args(fn, q, k, cos, sin, unsqueeze_dim, backend=None):
    """Checks the arguments of apply_rotary_pos_emb; returns cos and sin unsqueezed at unsqueeze_dim, as
    Hugging Face's function does before broadcasting them against q and k."""
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, fn, backend)
        if t.requires_grad and torch.is_grad_enabled():
            raise UnsupportedArgument(f"{fn}: {name} requires grad, but the gradients of cos and sin are not "
                                      "computed; build them under torch.no_grad() (as Hugging Face's rotary "
                                      "embeddings do) or detach them")
    if tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"{fn}: sin has shape {tuple(sin.shape)} but cos has shape {tuple(cos.shape)}")
    try:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    except (IndexError, RuntimeError, TypeError):
        raise ValueError(f"{fn}: unsqueeze_dim {unsqueeze_dim!r} is not a dim to insert into cos of shape "
                         f"{tuple(cos.shape)}") from None
    _rotary_tensors(fn, q, k, cos, sin, backend, f"cos unsqueezed at {unsqueeze_dim}")
    return cos, sin


def rotary_launcher_args(fn, q, k, cos, sin, backend, backward=False):
    """The rotary launchers' arguments (backend.py's contract): cos and sin already broadcastable, q and
    k with a unit last stride; in the backward one of them (the outputs' gradients) may be None."""
    if (q is None or k is None) and not (backward and (q is not None or k is not None)):
        raise ValueError(f"{fn}: q and k must be tensors{' (one may be None)' if backward else ''}, got "
                         f"{type(q).__name__} and {type(k).__name__}")
    _rotary_tensors(fn, q if q is not None else k, k if k is not None else q, cos, sin, backend)
    for name, t in (("q", q), ("k", k)):
        if t is not None:
            _check_rows(fn, name, t, backend)


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

def _check_qkv(fn, query, key, value, backend, enable_gqa=True):
    """enable_gqa: whether key and value may have fewer heads than query (grouped-query attention);
    the launchers take that whenever the shapes say so."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, fn, backend)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
    check_same(fn, "query", query, "key", key)
    check_same(fn, "query", query, "value", value)
    if backend is None:
        backend = backend_of_device(query)
    B, NH, TQ, HS = query.shape
    NKV, HSV = key.shape[1], value.shape[3]
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)}"
    if key.shape[0] != B or value.shape[0] != B or value.shape[1] != NKV:
        raise ValueError(f"{fn}: {shapes} must agree in batch and heads (key and value in heads)")
    if NKV != NH and not enable_gqa:
        raise ValueError(f"{fn}: {shapes} must agree in batch and heads (or pass enable_gqa=True for grouped-query "
                         "attention)")
    if NKV != NH and (NKV == 0 or NH % NKV != 0):
        raise ValueError(f"{fn}: grouped-query attention needs key/value heads that divide the query heads, got "
                         f"{shapes}")
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


def _check_mask(fn, attn_mask, query, key):
    """attn_mask as torch takes it: bool (True: the key takes part) or additive floating point (float32
    or query's dtype), 2-D to 4-D and broadcastable to (batch, heads, query len, key len)."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{fn}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise TypeError(f"{fn}: attn_mask must be bool, float32 or query's dtype ({query.dtype}), got "
                        f"{attn_mask.dtype}")
    check_same_device(fn, "query", query, "attn_mask", attn_mask)
    B, NH, TQ, _ = query.shape
    target = (B, NH, TQ, key.shape[2])
    shape = tuple(attn_mask.shape)
    if not 2 <= len(shape) <= 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"{fn}: attn_mask of shape {shape} does not broadcast to (batch, heads, query len, key len) "
                         f"= {target}")
    if attn_mask.requires_grad and torch.is_grad_enabled():
        raise UnsupportedArgument(f"{fn}: attn_mask requires grad, but nanofast gives the mask no gradient; detach "
                                  "it, or use torch.nn.functional.scaled_dot_product_attention for a learned mask")


def window_arg(fn, window, is_causal):
    """The sliding window (a nanofast extension): None (or 0) for none, else a positive int that narrows
    the causal mask to query i seeing keys i - window < j <= i. Returned as an int, 0 for none."""
    if window is None:
        return 0
    if type(window) is not int or window < 0:
        raise ValueError(f"{fn}: window must be a positive int or None, got {window!r}")
    if window and not is_causal:
        raise ValueError(f"{fn}: window={window} is a sliding window over the causal mask (query i sees keys "
                         "i - window < j <= i); pass is_causal=True with it")
    return window


def attention_args(query, key, value, attn_mask, dropout_p, scale, enable_gqa=False,
                   fn="nanofast.ops.scaled_dot_product_attention", backend=None):
    """Checks the arguments; returns (dropout_p, scale) as floats, scale defaulting to 1/sqrt(head_dim).
    The window, a nanofast extension, is checked by window_arg."""
    _check_qkv(fn, query, key, value, backend, enable_gqa)
    if attn_mask is not None:
        _check_mask(fn, attn_mask, query, key)
    dropout_p = check_probability(fn, "dropout_p", dropout_p)
    HS = query.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(HS) if HS > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be a finite number, got {scale}")
    return dropout_p, scale


def attention_forward_args(fn, q, k, v, dropout_p, seed, backend, attn_mask=None, window=0, is_causal=False):
    """The attention forward launcher's arguments (backend.py's contract)."""
    _check_qkv(fn, q, k, v, backend)
    if attn_mask is not None:
        _check_mask(fn, attn_mask, q, k)
    window_arg(fn, window, is_causal)
    check_probability(fn, "dropout_p", dropout_p)
    check_seed(fn, seed)


def attention_backward_args(fn, dout, q, k, v, out, lse, dropout_p, seed, backend, attn_mask=None, window=0,
                            is_causal=False):
    """The attention backward launcher's arguments (backend.py's contract)."""
    attention_forward_args(fn, q, k, v, dropout_p, seed, backend, attn_mask, window, is_causal)
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
