"""add + LayerNorm and add + RMSNorm composed from a backend's norm launchers: the dtype combinations a
backend has no fused kernel for (all of add + LayerNorm's on CUDA). The same results as the fused
kernels, unfused."""
from .._layout import unit_last_stride


def composed_add_layer_norm_forward(layer_norm_forward, x, residual, weight, bias, eps, out_dtype):
    """(h, y, mean, rstd) over the last dimension (unit stride) of x and residual, any leading dims."""
    # residual's dtype never promotes x's (checked), so h has x's dtype; contiguous, because the add
    # follows the inputs' strides and the rows below are a view of it
    h = (x + residual).contiguous()
    y, mean, rstd = layer_norm_forward(h.view(-1, h.shape[-1]), weight, bias, eps)
    return h, y.view(h.shape).to(out_dtype), mean, rstd


def composed_add_layer_norm_backward(layer_norm_backward, dy, dh, h, weight, mean, rstd, residual_dtype, need_w,
                                     need_b):
    """(dx, dresidual, dweight or None, dbias or None) in h's shape."""
    C = h.shape[-1]
    dx, dw, db = layer_norm_backward(unit_last_stride(dy).to(h.dtype).reshape(-1, C).contiguous(), h.view(-1, C),
                                     weight, mean, rstd, need_w, need_b)
    dx = dx.view(h.shape)
    if dh is not None:
        dx = dx + dh
    return dx, dx.to(residual_dtype), dw, db


def composed_add_rms_norm_forward(rms_norm_forward, x, residual, weight, eps, weight_offset, cast_before_weight,
                                  out_dtype):
    """(h, y, rstd) as the backend's rms_norm_forward with a residual, from its plain RMSNorm."""
    h = (x + residual).contiguous()
    _, y, rstd = rms_norm_forward(h, None, weight, eps, weight_offset, cast_before_weight, h.dtype)
    return h, y.to(out_dtype), rstd


def composed_add_rms_norm_backward(rms_norm_backward, dy, dh, h, weight, rstd, weight_offset, cast_before_weight,
                                   residual_dtype, need_weight_grad):
    """(dx, dresidual, dweight) as the backend's rms_norm_backward with a residual."""
    dx, _, dw = rms_norm_backward(unit_last_stride(dy).to(h.dtype), None, h, weight, rstd, weight_offset,
                                  cast_before_weight, None, need_weight_grad)
    if dh is not None:
        dx = dx + dh
    return dx, dx.to(residual_dtype) if residual_dtype != h.dtype else h.new_empty((0,)), dw
