"""nanofast::rotary_fwd / rotary_bwd — the rotary position embedding of q and k in one pass, as raw
custom ops with fakes, one autograd formula for them, and the user-facing `apply_rotary_pos_emb`,
Hugging Face's function of that name:

    q_embed = q * cos + rotate(q) * sin,   k_embed = k * cos + rotate(k) * sin

with cos and sin from the model's rotary embedding (position ids already applied, as the caller's
cos/sin carry them) unsqueezed at unsqueeze_dim to broadcast over the heads. rotate is rotate_half
(Llama, Qwen2, Mistral: the two halves of each head) or, with interleaved=True, the rotation of each
pair (2i, 2i + 1) (GPT-J, Meta's original Llama), whose cos and sin then repeat each frequency twice
(`repeat_interleave(2, -1)`). cos narrower than the head (GPT-NeoX's and Phi's partial rotary)
rotates the first cos.shape[-1] columns and copies the others. The results have the dtype q's and
cos's promote to (float32 for bfloat16 q beside float32 cos, as under autocast) and q's layout.

The backward is the transposed map, the rotation by -theta; cos and sin get no gradient. The formula
is used as in layer_norm.py: the custom ops' autograd under torch.compile, _EagerRotary around the
backend's launchers in eager mode.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._layout import empty_rows_like, unit_last_stride
from .backend import backend_for
from .checks import rotary_args
from .formula import register_formula


@torch.library.custom_op("nanofast::rotary_fwd", mutates_args=())
def rotary_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tuple[Tensor, Tensor]:
    return backend_for(q).rotary_forward(unit_last_stride(q), unit_last_stride(k), cos, sin, interleaved)


@rotary_fwd.register_fake
def _(q, k, cos, sin, interleaved):
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return empty_rows_like(unit_last_stride(q), dtype), empty_rows_like(unit_last_stride(k), dtype)


@torch.library.custom_op("nanofast::rotary_bwd", mutates_args=())
def rotary_bwd(dq: Optional[Tensor], dk: Optional[Tensor], cos: Tensor, sin: Tensor, interleaved: bool,
               dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    pack = lambda t: None if t is None else unit_last_stride(t)  # noqa: E731
    return backend_for(cos).rotary_backward(pack(dq), pack(dk), cos, sin, interleaved, dtype)


@rotary_bwd.register_fake
def _(dq, dk, cos, sin, interleaved, dtype):
    empty = lambda t: cos.new_empty((0,), dtype=dtype) if t is None else empty_rows_like(unit_last_stride(t), dtype)  # noqa: E731
    return empty(dq), empty(dk)


# ---- the autograd formula ----

def _setup_context(ctx, inputs, output):
    q, _, cos, sin, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved, ctx.dtype = interleaved, q.dtype


def _backward(ctx, dq_embed, dk_embed):
    """q's and k's gradients (None for cos and sin); ctx.raw_backward is the raw backward (the custom
    op, or in eager mode the backend's launcher). Either output's gradient may be None."""
    cos, sin = ctx.saved_tensors
    dq_embed = dq_embed if ctx.needs_input_grad[0] else None
    dk_embed = dk_embed if ctx.needs_input_grad[1] else None
    if dq_embed is None and dk_embed is None:
        return None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the gradients as a graph of torch's functions
        grad = lambda d: None if d is None else rotary_reference(d, cos, sin, ctx.interleaved,  # noqa: E731
                                                                 transpose=True).to(ctx.dtype)
        return grad(dq_embed), grad(dk_embed), None, None, None
    pack = lambda t: None if t is None else unit_last_stride(t)  # noqa: E731
    dq, dk = ctx.raw_backward(pack(dq_embed), pack(dk_embed), cos, sin, ctx.interleaved, ctx.dtype)
    return dq if dq_embed is not None else None, dk if dk_embed is not None else None, None, None, None


def _rotate(x, interleaved):
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(x, cos, sin, interleaved=False, transpose=False):
    """x * cos + rotate(x) * sin over x's first cos.shape[-1] columns (the others as they are), in torch's
    differentiable functions; transpose: the transposed map, x * cos - rotate(x * sin)."""
    R = cos.shape[-1]
    xr, rest = x[..., :R], x[..., R:]
    out = xr * cos - _rotate(xr * sin, interleaved) if transpose else xr * cos + _rotate(xr, interleaved) * sin
    return torch.cat((out, rest.to(out.dtype)), dim=-1) if R < x.shape[-1] else out


register_formula(rotary_fwd, rotary_bwd, _setup_context, _backward)


class _EagerRotary(torch.autograd.Function):
    """Eager mode: the formula above around the backend's launchers, without the op dispatch."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved, backend):
        ctx.set_materialize_grads(False)
        out = backend.rotary_forward(q, k, cos, sin, interleaved)
        _setup_context(ctx, (q, k, cos, sin, interleaved), out)
        ctx.raw_backward = backend.rotary_backward
        return out

    @staticmethod
    def backward(ctx, dq_embed, dk_embed):
        return *_backward(ctx, dq_embed, dk_embed), None


def rotary_on(backend, fn, q, k, cos, sin, unsqueeze_dim, interleaved):
    """apply_rotary_pos_emb on a given backend (None: the tensors'; nanofast.kernels passes the Triton
    one), with fn naming the function in error messages."""
    cos, sin = rotary_args(fn, q, k, cos, sin, unsqueeze_dim, backend)
    q, k = unit_last_stride(q), unit_last_stride(k)
    if backend is None and torch.compiler.is_compiling():
        if q.is_cuda:  # torch's ops, which the compiler fuses into its neighbours (as glu.py does)
            return rotary_reference(q, cos, sin, interleaved), rotary_reference(k, cos, sin, interleaved)
        return rotary_fwd(q, k, cos, sin, bool(interleaved))
    return _EagerRotary.apply(q, k, cos, sin, bool(interleaved), backend or backend_for(q))


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids=None, unsqueeze_dim: int = 1,
                         *, interleaved: bool = False) -> Tuple[Tensor, Tensor]:
    """Hugging Face's apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1) for q and
    k in one pass: (q * cos + rotate_half(q) * sin, the same for k), cos and sin unsqueezed at
    unsqueeze_dim (1 for (batch, heads, seq, head_dim) q and k, 2 for (batch, seq, heads, head_dim)).
    position_ids is unused, as there. interleaved=True rotates the pairs (2i, 2i + 1) instead of the
    halves (GPT-J's rotate_every_two)."""
    return rotary_on(None, "nanofast.ops.apply_rotary_pos_emb", q, k, cos, sin, unsqueeze_dim, interleaved)
