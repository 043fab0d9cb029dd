"""What a backend provides, and which backend serves a tensor.

A backend is a module of launchers: plain functions, no autograd, tensors in and out, arguments
already checked (checks.py). nanofast.ops' autograd formulas call them directly in eager mode and
through the raw custom ops (nanofast::*_fwd / *_bwd) under torch.compile. Two backends exist:

    cpu.py    the C++/OpenMP kernels (nanofast._C)
    cuda.py   nanofast.kernels' Triton kernels (LayerNorm, attention); torch's own for the rest

Launchers (every shape below is a tensor's; "stats" means backend.stats_dtype(x.dtype)):

    layer_norm_forward(x, weight, bias, eps) -> (y, mean, rstd)
        x (N, C) with a unit last stride; weight, bias (C,) or None; y (N, C) contiguous in x's
        dtype; mean, rstd (N,) stats.
    layer_norm_backward(dy, x, weight, mean, rstd, need_weight_grad, need_bias_grad) -> (dx, dw, db)
        dx (N, C) contiguous; dw, db (C,) in the weight's dtype, or None where not needed.
    add_layer_norm_forward(x, residual, weight, bias, eps, out_dtype) -> (h, y, mean, rstd)
        h = x + residual in x's dtype, y its LayerNorm in out_dtype, over the last dimension of any
        leading dimensions; fused for the (x, residual, y) dtypes in ADD_LAYER_NORM_DTYPES, composed
        from the LayerNorm launchers (compose.py) for the others.
    add_layer_norm_backward(dy, dh, h, weight, mean, rstd, residual_dtype, need_weight_grad,
                            need_bias_grad) -> (dx, dresidual, dw, db)
        dh (h's gradient) may be None; dresidual may be dx itself when the residual has h's dtype.
    rms_norm_forward(x, residual, weight, eps, weight_offset, cast_before_weight, out_dtype) -> (h, y, rstd)
        over the last dimension (unit stride) of any leading dimensions: h = x + residual in x's dtype
        (empty (0,) when residual is None), y = h * rstd * (weight + weight_offset) in out_dtype (x's
        without a residual), h * rstd rounded to x's dtype first where cast_before_weight; h and y
        contiguous in x's shape; rstd (N,) stats. With a residual, fused for the (x, residual, y) dtypes
        in ADD_RMS_NORM_DTYPES (None: all), composed (compose.py) for the others.
    rms_norm_backward(dy, dh, x, weight, rstd, weight_offset, cast_before_weight, residual_dtype,
                      need_weight_grad) -> (dx, dresidual, dw)
        x: the forward's x, or its h where it had a residual of residual_dtype (None: no residual);
        dh (h's gradient) may be None. dx contiguous in x's shape; dresidual empty without a
        residual or where it would be dx (a residual of x's dtype); dw (C,) or empty where not needed.
    attention_forward(q, k, v, is_causal, scale, dropout_p, seed, attn_mask=None, window=0) -> (out, lse)
        q (B, H, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), any strides with a unit last one, Hkv
        dividing H (query head h reads key/value head h // (H // Hkv)); out (B, H, Tq, Dv) laid out as
        (B, Tq, H, Dv) (_layout.empty_bthd); lse (B, H, Tq) stats, +inf for a query that sees no key
        (its output row is 0). seed: an int, a one-element int64 tensor (seed.py), or None without
        dropout. attn_mask: None, or bool / additive, 2-D to 4-D, broadcastable to (B, H, Tq, Tk), any
        strides (read in place: _layout.mask_strides); window: 0, or with is_causal the sliding
        window (query i sees keys i - window < j <= i).
    attention_backward(dout, q, k, v, out, lse, is_causal, scale, dropout_p, seed, attn_mask=None,
                       window=0) -> (dq, dk, dv)
        each in its input's layout where that is dense (_layout.empty_grad_like); dk, dv summed over
        each key/value head's group of query heads.
    gelu_forward(x, approximate) -> y,  gelu_backward(dy, x, approximate) -> dx  (only where RUNS_GELU)
        exact erf GELU (approximate "none") or its tanh approximation ("tanh").
    glu_forward(gate, up, activation) -> act(gate) * up
    glu_backward(dy, gate, up, activation) -> (dgate, dup)
        activation "silu" (SwiGLU), "gelu" or "gelu_tanh" (GEGLU); gate and up of one shape and dtype,
        any leading dimensions, a unit last stride; outputs contiguous in gate's shape.
    rotary_forward(q, k, cos, sin, interleaved) -> (q_embed, k_embed)
        q, k: up to 4 dims with a unit last stride; cos, sin: q's number of dims, broadcasting over
        the leading dims of each, last dim R (even, at most the head dim). x * cos + rotate(x) * sin
        over the first R columns, the others copied, in promote_types(q.dtype, cos.dtype), laid out
        as q and k where they are dense (_layout.empty_rows_like).
    rotary_backward(dq, dk, cos, sin, interleaved, dtype) -> (dq, dk)
        the transposed map in dtype (q's); dq or dk may be None (an empty (0,) result).
    dropout_mask(seed, batch, heads, q_len, k_len, p) -> bool (batch, heads, q_len, k_len)
        the keep mask the attention kernels apply for that seed.
    dropout(x, p, seed) -> y                                 (only where RUNS_DROPOUT)
        keyed by seed; the same call on the gradient is the backward.
    linear(x, weight, bias, dtype) -> y                      (only where RUNS_LINEAR)
    linear_backward(dy, x, weight, need_input_grad, need_weight_grad, need_bias_grad, dtype)
        -> (dx, dw, db), None where not needed; dtype: the products' (autocast's), None for x's.
    linear_cross_entropy_forward(x, weight, bias, target, ignore_index, label_smoothing, reduction, dtype,
                                 need_input_grad, need_weight_grad, need_bias_grad)
        -> (loss, dx, dw, db)
        cross_entropy(x @ weight^T + bias, target) over (N, C) rows and (N,) int64 targets, a chunk of
        rows at a time (chunked_cross_entropy.py); dtype as linear's. loss: 0-d, or (N,) for "none";
        dx, dw, db: for "mean" and "sum", the loss's gradients in the accumulation dtype, else None.
    linear_cross_entropy_backward(dloss, x, weight, bias, target, ignore_index, label_smoothing, dtype,
                                  need_input_grad, need_weight_grad, need_bias_grad) -> (dx, dw, db)
        "none"'s gradients for the rows' loss gradients dloss (N,), the chunks recomputed.

Capabilities (data, read by checks.py and the ops):

    NAME                       for error messages
    DTYPES                     the floating-point dtypes the kernels take
    MAX_HEAD_DIM               attention's largest head size
    VALUE_HEAD_DIM_MAY_DIFFER  whether v's head size may differ from q's and k's
    LAYER_NORM_PARAMS_ANY_DTYPE  whether LayerNorm's weight and bias may have another of DTYPES than
                               the input (the gradients then come in the parameters' dtype)
    MAX_BATCH_HEADS            attention's largest batch * heads (None: no limit)
    ADD_LAYER_NORM_DTYPES      the (x, residual, y) dtypes the fused add + LayerNorm kernel takes
    ADD_RMS_NORM_DTYPES        the same for add + RMSNorm (None: every combination)
    RUNS_GELU, RUNS_DROPOUT, RUNS_LINEAR  False: nanofast.ops hands those ops to torch.nn.functional
    stats_dtype(dtype)         the dtype of the saved LayerNorm statistics and attention's lse
"""
from . import cpu, cuda


def backend_for(t):
    """The backend that serves tensor t: CUDA tensors the CUDA backend, others the CPU one (the
    checks have turned away devices that no backend serves)."""
    return cuda if t.is_cuda else cpu


def backend_of_device(t):
    """The backend of t's device, or None when nanofast has none for it (is_cuda and is_cpu, not
    t.device: this runs on every call, and building a device object costs more than the two reads)."""
    return cuda if t.is_cuda else cpu if t.is_cpu else None
