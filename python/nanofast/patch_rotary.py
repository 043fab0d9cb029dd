"""The rotary position embedding of Hugging Face models that nanofast.patch has patched.

transformers applies the rotary embedding in a module-level function, apply_rotary_pos_emb, that each
attention module's forward calls. Where Hugging Face's `kernels` package is installed, transformers makes
that function a hub-kernel layer (`use_kernel_forward_from_hub("rotary_pos_emb")`) and gives every
attention module a private copy of it (`attention._kernel_funcs["rotary_pos_emb"]`), to which the
attention's forward routes its calls: replacing that copy's forward, as `kernels.kernelize` does, routes
one model's rotary application and changes nothing process-wide. Without `kernels` the function is a
plain module global, which could only be routed by swapping it for every model of the process, so there
the rotary application stays transformers' (no warning: nothing is wrong, a package is missing).

A copy is routed only if its function computes what nanofast.ops.apply_rotary_pos_emb computes: at patch
time (once per function) it is called on small random inputs, the two layouts and a partial rotation,
and compared with the op, rotating halves or interleaved pairs. A call the op does not take (other
arguments, cos that requires grad) runs the model's own function, with one warning per reason.
"""
import inspect
import warnings
from types import MethodType

import torch

from . import ops
from .ops import checks

KERNEL_NAME = "rotary_pos_emb"  # the hub-kernel layer name transformers gives apply_rotary_pos_emb
_warned = set()


_KNOWN = {}  # a hub-kernel copy's class -> (the function it wraps, its rotation): a plain dict, so that
# torch.compile reads it instead of tracing the probe


def _known(func_class):
    """(the function a hub-kernel copy's class wraps, the model's apply_rotary_pos_emb; interleaved if it
    computes ops.apply_rotary_pos_emb with it, else None), worked out once per class."""
    if func_class not in _KNOWN:
        try:
            func = inspect.getclosurevars(func_class.forward).nonlocals.get("func")
        except (TypeError, ValueError):
            func = None
        _KNOWN[func_class] = (func, _rotation(func) if callable(func) else None)
    return _KNOWN[func_class]


def _rotation(func):
    """interleaved (False: halves, True: pairs) if func computes ops.apply_rotary_pos_emb with it, for q
    and k of other head counts, in both layouts and with a partial rotation; else None."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for unsqueeze_dim, width in ((1, 8), (2, 8), (1, 4)):
        q_shape, k_shape = ((2, 3, 5, 8), (2, 1, 5, 8)) if unsqueeze_dim == 1 else ((2, 5, 3, 8), (2, 5, 1, 8))
        q, k = torch.randn(q_shape, generator=g, device="cpu"), torch.randn(k_shape, generator=g, device="cpu")
        cos, sin = (torch.randn(2, 5, width, generator=g, device="cpu") for _ in range(2))
        cases.append((q, k, cos, sin, unsqueeze_dim))
    for interleaved in (False, True):
        if all(_agrees(func, interleaved, *case, may_refuse=i > 0) for i, case in enumerate(cases)):
            return interleaved
    return None


def _agrees(func, interleaved, q, k, cos, sin, unsqueeze_dim, may_refuse):
    """Whether func gives the op's results for this call; a function may refuse a call (another layout,
    a partial rotation) that its model then never makes."""
    with torch.no_grad():
        try:
            theirs = func(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim) if unsqueeze_dim != 1 else func(q, k, cos, sin)
        except Exception:  # noqa: BLE001 (any refusal)
            return may_refuse
        ours = ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=interleaved)
    return (isinstance(theirs, (tuple, list)) and len(theirs) == 2
            and all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(theirs, ours)))


def _unsupported_reason(interleaved, args, kwargs):
    """Why the op does not take this call (for the warning), or None."""
    if interleaved is None:
        return "the function does not compute nanofast's rotary embedding"
    if len(args) != 4 or not set(kwargs) <= {"unsqueeze_dim"}:
        return f"arguments other than q, k, cos, sin and unsqueeze_dim: {len(args)} positional, {sorted(kwargs)}"
    try:
        checks.rotary_args("nanofast.ops.apply_rotary_pos_emb", *args, kwargs.get("unsqueeze_dim", 1))
    except (TypeError, ValueError) as e:  # UnsupportedArgument is a ValueError too
        return str(e).split(": ", 1)[-1]
    return None


def _routed_rotary(self, *args, **kwargs):
    """The forward of an attention module's copy of apply_rotary_pos_emb (bound to the copy; under
    torch.compile transformers calls it with the shared function as self): nanofast's op where it takes
    the call, the model's own function elsewhere."""
    func, interleaved = _known(type(self))
    reason = _unsupported_reason(interleaved, args, kwargs)
    if reason is None:
        return ops.apply_rotary_pos_emb(*args, unsqueeze_dim=kwargs.get("unsqueeze_dim", 1), interleaved=interleaved)
    _warn_once(reason)
    return func(*args, **kwargs)


def _warn_once(reason):
    kind = reason.split(" ", 1)[0]
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"nanofast.patch: falling back to transformers' apply_rotary_pos_emb ({reason})", stacklevel=3)


def _copy(module):
    funcs = module.__dict__.get("_kernel_funcs")
    return funcs.get(KERNEL_NAME) if isinstance(funcs, dict) else None


def route(model):
    """Routes each attention module's copy of a recognised apply_rotary_pos_emb to nanofast (a copy
    whose forward another library has set is left alone), remembering which."""
    routed = model.__dict__.setdefault("_nanofast_rotary", [])
    for name, module in model.named_modules():
        copy = _copy(module)
        if copy is not None and "forward" not in copy.__dict__ and _known(type(copy))[1] is not None:
            copy.forward = MethodType(_routed_rotary, copy)  # a method, as transformers reads forward.__func__
            routed.append(name)


def restore(model):
    for name in model.__dict__.pop("_nanofast_rotary", []):
        copy = _copy(model.get_submodule(name))
        forward = copy.__dict__.get("forward") if copy is not None else None
        if getattr(forward, "__func__", None) is _routed_rotary:
            del copy.__dict__["forward"]
