"""nanofast::rms_norm_fwd / rms_norm_bwd — RMSNorm, and the residual add fused with the RMSNorm after
it, as raw custom ops with fakes, one autograd formula for them, and the user-facing `rms_norm` and
`add_rms_norm`.

    y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset)

with the statistic in float32 for 16-bit inputs. Where the rounding happens tells the models apart,
and the ops follow each:

* torch.nn.functional.rms_norm, torch.nn.RMSNorm: y rounded once to the input's dtype (the default);
* Hugging Face's LlamaRMSNorm (Llama, Qwen2, Mistral, SmolLM): `weight * (x * rstd).to(input_dtype)`,
  the normalised rows rounded before the weight multiplies them: cast_before_weight=True;
* Gemma's RMSNorm: `x * rstd * (1 + weight)` in float32, rounded once: weight_offset=1.0.

In float32 the three agree bit for bit where the weight offset does. add_rms_norm is a pre-norm
block's `h = x + residual; y = rms_norm(h)` in one pass over the rows (forward and backward), as
add_layer_norm is for LayerNorm: one pair of custom ops serves both functions, the residual None for
a plain RMSNorm.

The formula is used as in layer_norm.py: the custom ops' autograd under torch.compile, _EagerRmsNorm
around the backend's launchers in eager mode.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._layout import unit_last_stride
from . import cuda
from .backend import backend_for
from .checks import add_rms_norm_args, rms_norm_args
from .formula import differentiable_grads, register_formula


@torch.library.custom_op("nanofast::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], eps: float, weight_offset: float,
                 cast_before_weight: bool, out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    residual = None if residual is None else unit_last_stride(residual)
    return backend_for(x).rms_norm_forward(unit_last_stride(x), residual, weight, eps, weight_offset,
                                           cast_before_weight, out_dtype)


@rms_norm_fwd.register_fake
def _(x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype):
    N = math.prod(x.shape[:-1])
    h = x.new_empty(x.shape if residual is not None else (0,))
    return h, x.new_empty(x.shape, dtype=out_dtype), x.new_empty((N,), dtype=backend_for(x).stats_dtype(x.dtype))


@torch.library.custom_op("nanofast::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                 weight_offset: float, cast_before_weight: bool, residual_dtype: Optional[torch.dtype],
                 need_weight_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return backend_for(x).rms_norm_backward(unit_last_stride(dy), dh, unit_last_stride(x), weight, rstd, weight_offset,
                                            cast_before_weight, residual_dtype, need_weight_grad)


@rms_norm_bwd.register_fake
def _(dy, dh, x, weight, rstd, weight_offset, cast_before_weight, residual_dtype, need_weight_grad):
    separate = residual_dtype is not None and residual_dtype != x.dtype
    dres = x.new_empty(x.shape, dtype=residual_dtype) if separate else x.new_empty((0,))
    C = x.shape[-1] if need_weight_grad and weight is not None else 0
    return x.new_empty(x.shape), dres, x.new_empty((C,))


# The CUDA twins for torch.compile (as in layer_norm.py): triton_ops whose bodies torch.compile traces.

@torch.library.triton_op("nanofast::rms_norm_fwd_triton", mutates_args=())
def rms_norm_fwd_triton(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], eps: float,
                        weight_offset: float, cast_before_weight: bool,
                        out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    residual = None if residual is None else unit_last_stride(residual)
    return cuda.rms_norm_forward(unit_last_stride(x), residual, weight, eps, weight_offset, cast_before_weight,
                                 out_dtype, launch=torch.library.wrap_triton)


@torch.library.triton_op("nanofast::rms_norm_bwd_triton", mutates_args=())
def rms_norm_bwd_triton(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                        weight_offset: float, cast_before_weight: bool, residual_dtype: Optional[torch.dtype],
                        need_weight_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return cuda.rms_norm_backward(unit_last_stride(dy), dh, unit_last_stride(x), weight, rstd, weight_offset,
                                  cast_before_weight, residual_dtype, need_weight_grad,
                                  launch=torch.library.wrap_triton)


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    x, residual, weight, eps, weight_offset, cast_before_weight, _ = inputs
    h, _, rstd = output
    ctx.save_for_backward(x if residual is None else h, weight, rstd)  # the rows that were normalised
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.eps, ctx.weight_offset, ctx.cast_before_weight = eps, weight_offset, cast_before_weight


def _backward(ctx, dh, dy, *_):
    """The inputs' gradients; ctx.raw_backward is the raw backward (the custom op, or in eager mode the
    backend's launcher). dh (the sum's gradient, with a residual) or dy may be None where that output
    was not used."""
    x, weight, rstd = ctx.saved_tensors
    has_residual = ctx.residual_dtype is not None
    dh = dh if has_residual else None
    need_w = weight is not None and ctx.needs_input_grad[2]
    if dy is None:  # the normalised rows were not used: only the sum's gradient flows
        dx = torch.zeros_like(x) if dh is None else dh
        return dx, dx.to(ctx.residual_dtype) if has_residual else None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True (x, when it is h, leads back through this op)
        reference = lambda x, w: rms_norm_reference(x, w, ctx.eps, ctx.weight_offset,  # noqa: E731
                                                    ctx.cast_before_weight).to(dy.dtype)
        dx, dw = differentiable_grads(reference, (x, weight), (True, need_w), (dy,))
        dx = dx if dh is None else dx + dh
        dres = dx.to(ctx.residual_dtype) if has_residual else None
    else:
        dx, dres, dw = ctx.raw_backward(unit_last_stride(dy), dh, x, weight, rstd, ctx.weight_offset,
                                        ctx.cast_before_weight, ctx.residual_dtype, need_w)
        if has_residual and ctx.residual_dtype == x.dtype:  # the residual's gradient is dx itself
            dres = dx
    return (dx, dres if has_residual else None, dw if need_w else None) + (None,) * 4


def rms_norm_reference(x, weight, eps, weight_offset=0.0, cast_before_weight=False):
    """The forward over the last dimension in torch's differentiable functions, rounded as the kernels
    round, the statistic in float32 for 16-bit rows. A weight of another dtype than x's (which the
    kernels do not take) gives the models' result dtype: x's, or with cast_before_weight the two dtypes'
    promotion, as LlamaRMSNorm's `weight * x.to(input_dtype)`."""
    xf = x if x.dtype == torch.float64 else x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return n.to(x.dtype)
    out_dtype = x.dtype
    if cast_before_weight:
        n = n.to(x.dtype).to(xf.dtype)
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return (n * (weight.to(xf.dtype) + weight_offset)).to(out_dtype)


register_formula(rms_norm_fwd, rms_norm_bwd, _setup_context, _backward)
register_formula(rms_norm_fwd_triton, rms_norm_bwd_triton, _setup_context, _backward)


class _EagerRmsNorm(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype, backend):
        ctx.set_materialize_grads(False)
        out = backend.rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype)
        _setup_context(ctx, (x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype), out)
        ctx.raw_backward = backend.rms_norm_backward
        return out[0], out[1]

    @staticmethod
    def backward(ctx, dh, dy):
        return *_backward(ctx, dh, dy), None


def _run(backend, input, residual, normalized_shape, weight, eps, weight_offset, cast_before_weight, out_dtype):
    """(h, y) in input's shape: the custom op under torch.compile (backend None), else the eager Function;
    the launchers take any leading dimensions, so only a multi-dimensional normalized_shape is reshaped."""
    C = math.prod(normalized_shape)
    x = unit_last_stride(input)
    r = None if residual is None else unit_last_stride(residual)
    w = weight
    if len(normalized_shape) > 1:
        x = unit_last_stride(x.reshape(-1, C))
        r = None if r is None else unit_last_stride(r.reshape(-1, C))
        w = None if w is None else w.reshape(C)
    args = (x, r, w, eps, weight_offset, cast_before_weight, out_dtype)
    if backend is None and torch.compiler.is_compiling():
        h, y = (rms_norm_fwd_triton if x.is_cuda else rms_norm_fwd)(*args)[:2]
    else:
        h, y = _EagerRmsNorm.apply(*args, backend or backend_for(x))
    if len(normalized_shape) == 1:
        return h, y
    return h.view(input.shape) if residual is not None else h, y.view(input.shape)


def rms_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
             weight_offset: float = 0.0, cast_before_weight: bool = False) -> Tensor:
    """torch.nn.functional.rms_norm: normalise over the trailing `normalized_shape` by the root mean
    square (eps None: the machine epsilon of the statistic's dtype, as torch). weight_offset=1.0 gives
    Gemma's (1 + weight); cast_before_weight=True rounds the normalised rows to input's dtype before the
    weight multiplies them, as Hugging Face's LlamaRMSNorm."""
    return rms_norm_on(None, "nanofast.ops.rms_norm", input, normalized_shape, weight, eps, weight_offset,
                       cast_before_weight)


def rms_norm_on(backend, fn, input, normalized_shape, weight, eps, weight_offset=0.0, cast_before_weight=False):
    """rms_norm on a given backend (None: the tensor's; nanofast.kernels passes the Triton one, for CPU
    tensors too), with fn naming the function in error messages."""
    normalized_shape, eps, weight_offset = rms_norm_args(input, normalized_shape, weight, eps, weight_offset, fn,
                                                         backend)
    return _run(backend, input, None, normalized_shape, weight, eps, weight_offset, bool(cast_before_weight),
                input.dtype)[1]


def add_rms_norm(input: Tensor, residual: Tensor, normalized_shape, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, out_dtype: Optional[torch.dtype] = None, *, weight_offset: float = 0.0,
                 cast_before_weight: bool = False) -> Tuple[Tensor, Tensor]:
    """(input + residual, rms_norm(input + residual, normalized_shape, weight, eps, ...)), the sum in input's
    dtype (residual may be of input's dtype or a lower precision one: bfloat16 beside float32), the
    normalised tensor in out_dtype (default: input's dtype). A Llama decoder layer's
    `hidden = residual + attn_out; residual = hidden; hidden = post_attention_layernorm(hidden)` is
    `residual, hidden = add_rms_norm(residual, attn_out, (C,), weight, eps, cast_before_weight=True)`."""
    normalized_shape, eps, weight_offset, out_dtype = add_rms_norm_args(input, residual, normalized_shape, weight, eps,
                                                                        weight_offset, out_dtype)
    return _run(None, input, residual, normalized_shape, weight, eps, weight_offset, bool(cast_before_weight),
                out_dtype)
