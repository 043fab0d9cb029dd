"""The CUDA backend, as backend.py describes it: nanofast.kernels' Triton launchers for LayerNorm,
RMSNorm, the gated MLP's activations, the rotary embedding and attention, torch's own kernels for GELU
(already memory-bound on a GPU), and no dropout or linear launchers (nanofast.ops hands those to torch
on CUDA tensors).

nanofast.kernels and triton are imported on the first launch, so that `import nanofast` needs neither
triton nor a GPU. The launchers here are the Triton ones without argument checks: nanofast.ops has
checked the arguments already (checks.py), against the capabilities written here. nanofast.kernels'
public functions run these same launchers on CPU tensors too, under TRITON_INTERPRET=1.
"""
import torch

from .compose import composed_add_layer_norm_backward, composed_add_layer_norm_forward
from .seed import seed_value

# ---- capabilities (read by checks.py and the ops; see backend.py) ----
NAME = "nanofast's CUDA backend (Triton)"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # the attention kernels keep a head's row in one tile
VALUE_HEAD_DIM_MAY_DIFFER = False
LAYER_NORM_PARAMS_ANY_DTYPE = True  # e.g. float32 weights on bfloat16 rows
MAX_BATCH_HEADS = 65535  # the attention kernels' second grid dimension
RUNS_DROPOUT = False
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


def layer_norm_forward(x, weight, bias, eps):
    return _kernels("layernorm").layer_norm_forward(x, weight, bias, eps)


def layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad):
    return _kernels("layernorm").layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad)


def add_layer_norm_forward(x, residual, weight, bias, eps, out_dtype):
    return composed_add_layer_norm_forward(layer_norm_forward, x, residual, weight, bias, eps, out_dtype)


def add_layer_norm_backward(dy, dh, h, weight, mean, rstd, residual_dtype, need_weight_grad, need_bias_grad):
    return composed_add_layer_norm_backward(layer_norm_backward, dy, dh, h, weight, mean, rstd, residual_dtype,
                                            need_weight_grad, need_bias_grad)


def _launch(launch):
    return {} if launch is None else {"launch": launch}


def rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype, launch=None):
    return _kernels("rmsnorm").rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype,
                                                **_launch(launch))


def rms_norm_backward(dy, dh, x, weight, rstd, weight_offset, cast_before_weight, residual_dtype, need_weight_grad,
                      launch=None):
    return _kernels("rmsnorm").rms_norm_backward(dy, dh, x, weight, rstd, weight_offset, cast_before_weight,
                                                 residual_dtype, need_weight_grad, **_launch(launch))


def attention_forward(q, k, v, is_causal, scale, dropout_p, seed):
    return _kernels("attention").attention_forward(q, k, v, is_causal, scale, dropout_p, seed_value(seed))


def attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed):
    return _kernels("attention").attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p,
                                                    seed_value(seed))


def gelu_forward(x, approximate="none"):
    return torch.ops.aten.gelu(x, approximate=approximate)


def gelu_backward(dy, x, approximate="none"):
    return torch.ops.aten.gelu_backward(dy, x, approximate=approximate)


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
