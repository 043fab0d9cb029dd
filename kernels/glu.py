"""The gated MLP's activation in Triton: act(gate) * up (SwiGLU: act = SiLU; GEGLU: GELU, exact or
tanh), forward, and the backward's two gradients in one pass.

gate and up are (N, C) rows with any row strides and a unit column stride (the two halves of one
(N, 2C) projection are such views), read as they are; outputs are contiguous. Arithmetic is in float32
whatever the storage type. SiLU and the tanh GELU go through a sigmoid, x * s with s = 1 / (1 + exp(-t)):
the tanh form's 1 + tanh(z) is 2 * sigmoid(2z), which keeps the negative tail's digits.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, check_device, device_guard, direct, is_interpreted, next_pow2

ACTIVATION_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """(act(x), act'(x)) in float32."""
    if ACT == 0:  # SiLU
        s = tl.sigmoid(x)
        return x * s, s + x * s * (1.0 - s)
    elif ACT == 1:  # GELU, the erf form
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    else:  # GELU, the tanh approximation
        x2 = x * x
        s = tl.sigmoid(1.5957691216057308 * x * (1.0 + 0.044715 * x2))
        return x * s, s + 1.5957691216057308 * x * s * (1.0 - s) * (1.0 + 0.134145 * x2)


@triton.jit
def _glu_kernel(
    G, U,  # gate and up (N, C), row strides stride_g and stride_u, column stride 1
    DY,  # the output gradient (N, C) contiguous; a dummy in the forward
    OUT,  # the forward's output, or the backward's dgate, (N, C) contiguous
    DUP,  # the backward's dup (N, C) contiguous; a dummy in the forward
    stride_g, stride_u,
    N, C,
    ACT: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < N)[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, da = _activation(g, ACT)
    dense = rows64 * C + cols[None, :]
    if BACKWARD:
        dy = tl.load(DY + dense, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + dense, (dy * u * da).to(OUT.dtype.element_ty), mask=mask)
        tl.store(DUP + dense, (dy * a).to(DUP.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + dense, (a * u).to(OUT.dtype.element_ty), mask=mask)


def _rows(t, C):
    return t if t.dim() == 2 else t.reshape(-1, C)


def _launch_glu(gate, up, dy, out, dup, activation, backward, launch):
    C = gate.shape[-1]
    g2, u2 = _rows(gate, C), _rows(up, C)
    N = g2.shape[0]
    if N == 0 or C == 0:
        return
    BLOCK_N = min(next_pow2(C), 128 if gate.is_cuda else 64)
    BLOCK_M = max(1, min(64, 2048 // BLOCK_N)) if gate.is_cuda else 8
    grid = (cdiv(N, BLOCK_M), cdiv(C, BLOCK_N))
    with device_guard(gate):
        launch(_glu_kernel)[grid](
            g2, u2, g2 if dy is None else dy, out, out if dup is None else dup, g2.stride(0), u2.stride(0), N, C,
            ACT=ACTIVATION_CODE[activation], BACKWARD=backward, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=4,
        )


def glu_forward(gate, up, activation, *, launch=direct):
    """act(gate) * up, contiguous in gate's shape; activation "silu", "gelu" or "gelu_tanh". gate and up
    share a shape and a dtype, any leading dimensions, a unit last stride. ``launch`` wraps the kernel
    before its launch (_common.direct). The arguments are checked by the callers (nanofast.ops.checks)."""
    check_device("gate", gate, is_interpreted(_glu_kernel))
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch_glu(gate, up, None, out, None, activation, False, launch)
    return out


def glu_backward(dy, gate, up, activation, *, launch=direct):
    """(dgate, dup) = (dy * up * act'(gate), dy * act(gate)), contiguous in gate's shape."""
    check_device("gate", gate, is_interpreted(_glu_kernel))
    dy = dy.contiguous()
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch_glu(gate, up, dy, dgate, dup, activation, True, launch)
    return dgate, dup
