"""The CUDA backend, as backend.py describes it: nanofast.kernels' Triton launchers for LayerNorm,
RMSNorm, the gated MLP's activations, the rotary embedding and attention, and no GELU, dropout or
linear launchers: nanofast.ops hands those to torch on CUDA tensors, where torch.compile fuses them
with their neighbours (a kernel of nanofast's would stop that).

nanofast.kernels and triton are imported on the first launch, so that `import nanofast` needs neither
triton nor a GPU. The launchers here are the Triton ones without argument checks: nanofast.ops has
checked the arguments already (checks.py), against the capabilities written here. nanofast.kernels'
public functions run these same launchers on CPU tensors too, under TRITON_INTERPRET=1.

Each Triton launcher takes `launch`, which wraps a kernel before its launch: None launches it
directly (eager mode), torch.library.wrap_triton records it (the triton_op bodies in triton_ops.py,
which torch.compile traces). Dropout seeds stay on the device (seed.py): the kernels read them from
memory, so nothing here reads a value on the host.
"""
import functools

import torch

from . import chunked_cross_entropy
from .compose import composed_add_layer_norm_backward, composed_add_layer_norm_forward

# ---- capabilities (read by checks.py and the ops; see backend.py) ----
NAME = "nanofast's CUDA backend (Triton)"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # the attention kernels keep a head's row in one tile
VALUE_HEAD_DIM_MAY_DIFFER = False
LAYER_NORM_PARAMS_ANY_DTYPE = True  # e.g. float32 weights on bfloat16 rows
MAX_BATCH_HEADS = 65535  # the attention kernels' second grid dimension
RUNS_DROPOUT = False
RUNS_GELU = False  # torch's GELU, which torch.compile fuses into its neighbours
RUNS_LINEAR = False
ADD_LAYER_NORM_DTYPES = frozenset()  # no fused kernel: add_layer_norm_* compose
ADD_RMS_NORM_DTYPES = None  # every combination fused (the kernel converts as it loads and stores)


def stats_dtype(dtype):
    return torch.float32


_modules = {}


def _kernels(name):
    """nanofast.kernels' submodule `name`, imported on first use (it imports triton)."""
    module = _modules.get(name)
    if module is None:
        try:
            from .. import kernels
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise RuntimeError("nanofast: CUDA tensors need the Triton kernels (pip install 'nanofast[triton]')") from e
        module = _modules[name] = kernels.submodule(name)
    return module


def _launch(launch):
    return {} if launch is None else {"launch": launch}


def layer_norm_forward(x, weight, bias, eps, launch=None):
    return _kernels("layernorm").layer_norm_forward(x, weight, bias, eps, **_launch(launch))


def layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad, launch=None):
    return _kernels("layernorm").layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad,
                                                     **_launch(launch))


def add_layer_norm_forward(x, residual, weight, bias, eps, out_dtype, launch=None):
    forward = functools.partial(layer_norm_forward, launch=launch)
    return composed_add_layer_norm_forward(forward, x, residual, weight, bias, eps, out_dtype)


def add_layer_norm_backward(dy, dh, h, weight, mean, rstd, residual_dtype, need_weight_grad, need_bias_grad,
                            launch=None):
    backward = functools.partial(layer_norm_backward, launch=launch)
    return composed_add_layer_norm_backward(backward, dy, dh, h, weight, mean, rstd, residual_dtype,
                                            need_weight_grad, need_bias_grad)


def rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype, launch=None):
    return _kernels("rmsnorm").rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype,
                                                **_launch(launch))


def rms_norm_backward(dy, dh, x, weight, rstd, weight_offset, cast_before_weight, residual_dtype, need_weight_grad,
                      launch=None):
    return _kernels("rmsnorm").rms_norm_backward(dy, dh, x, weight, rstd, weight_offset, cast_before_weight,
                                                 residual_dtype, need_weight_grad, **_launch(launch))


def attention_forward(q, k, v, is_causal, scale, dropout_p, seed, attn_mask=None, window=0, launch=None):
    return _kernels("attention").attention_forward(q, k, v, is_causal, scale, dropout_p, _seed(seed), attn_mask, window,
                                                   **_launch(launch))


def attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed, attn_mask=None, window=0,
                       launch=None):
    return _kernels("attention").attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p,
                                                    _seed(seed), attn_mask, window, **_launch(launch))


def _seed(seed):
    """The seed as nanofast.kernels takes it (an int or a tensor, read by the kernels on the device);
    0 for None (no dropout)."""
    return 0 if seed is None else seed


def glu_forward(gate, up, activation, launch=None):
    return _kernels("glu").glu_forward(gate, up, activation, **_launch(launch))


def glu_backward(dy, gate, up, activation, launch=None):
    return _kernels("glu").glu_backward(dy, gate, up, activation, **_launch(launch))


def rotary_forward(q, k, cos, sin, interleaved, launch=None):
    return _kernels("rope").rotary_forward(q, k, cos, sin, interleaved, **_launch(launch))


def rotary_backward(dq, dk, cos, sin, interleaved, dtype, launch=None):
    return _kernels("rope").rotary_backward(dq, dk, cos, sin, interleaved, dtype, **_launch(launch))


def dropout_mask(seed, batch, heads, q_len, k_len, p):
    return _kernels("attention").dropout_mask(seed, batch, heads, q_len, k_len, p)


# linear_cross_entropy: torch's matmuls and the row pass in torch ops, a chunk of rows at a time
_chunk_pieces = (chunked_cross_entropy.torch_mm, chunked_cross_entropy.torch_rows, chunked_cross_entropy.torch_operand)
linear_cross_entropy_forward = functools.partial(chunked_cross_entropy.forward, *_chunk_pieces)
linear_cross_entropy_backward = functools.partial(chunked_cross_entropy.backward, *_chunk_pieces)
