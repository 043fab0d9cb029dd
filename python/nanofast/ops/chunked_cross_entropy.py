"""The chunk loop of linear_cross_entropy, for both backends: the logits of a chunk of rows, their loss
and their gradient, turned at once into the chunk's input gradient and added into the weight's and
bias's, so that the (N, V) logits are never stored whole, in the forward or the backward.

A backend passes its pieces in (cpu.py: nanofast's GEMMs and the C++ row pass; cuda.py: torch's
matmuls and the row pass below in torch ops):

    mm(a, b, bias=None, dtype=None, out=None, accumulate=False)   cpu.mm's signature and contract
    rows(logits, target, ignore_index, label_smoothing, grad_scale, row_scale, grad, loss)
        -> (loss_sum, count, bad_row)
        the rows' losses written into loss, and with grad their gradient (times grad_scale, and times
        row_scale where given) over the logits; ignored rows get 0. loss_sum and count (the rows not
        ignored) are numbers or 0-d tensors; bad_row is the first row whose target is out of range
        (nothing computed then), -1 where there is none, or None where the backend checks on the device
        instead. With logits None it only counts the targets (not ignored), unchecked.
    operand(weight, dtype) -> the weight as mm reads it for products in dtype (a cast copy, or itself
        where mm rounds while packing)
"""
import math

import torch

# A chunk's logits take at most CHUNK_BYTES, but the chunk has at least CHUNK_MIN_ROWS rows: each
# chunk's products read the whole weight twice and its gradient's sums once, and with fewer rows than
# that (a wide vocabulary) the products would spend more time reading the weight than multiplying it.
CHUNK_BYTES = 8 << 20
CHUNK_MIN_ROWS = 512


def chunk_rows(N, V, itemsize):
    """Rows per chunk for N rows of V logits of itemsize bytes each."""
    return max(1, min(N, max(CHUNK_MIN_ROWS, CHUNK_BYTES // max(1, V * itemsize))))


def accumulation_dtype(dtype):
    """The logits', losses' and gradient sums' dtype for products in dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_dtype(x, dtype):
    """The loss's dtype: torch's cross-entropy keeps the logits' dtype, which is x's, or float32 under
    autocast (dtype given), where cross-entropy runs in float32."""
    return x.dtype if dtype is None else torch.float32


def _check(bad, target, row, V, ignore_index):
    if bad is not None and bad >= 0:
        from .checks import target_out_of_range  # (here: checks imports the backends, which import this)
        raise target_out_of_range("nanofast.ops.linear_cross_entropy", target, row + bad, V, ignore_index)


def _chunks(mm, rows, operand, x, weight, bias, target, ignore_index, label_smoothing, dtype, need_x, need_w,
            need_b, grad_scale, row_scale):
    """The loop: (row losses (N,), their sum, the count of rows not ignored, dx, dw, db), the gradients
    of the rows' losses summed, times grad_scale (and each row's times row_scale when given), in the
    accumulation dtype, None where not needed."""
    N, C = x.shape
    V = weight.shape[0]
    dtype = dtype or x.dtype
    acc = accumulation_dtype(dtype)
    grad = need_x or need_w or need_b
    losses = x.new_empty(N, dtype=acc)
    dx = x.new_empty((N, C), dtype=acc) if need_x else None
    zeros_or_empty = torch.empty if N else torch.zeros  # (no chunk writes them when there are no rows)
    dw = zeros_or_empty((V, C), dtype=acc, device=x.device) if need_w else None
    db = zeros_or_empty(V, dtype=acc, device=x.device) if need_b else None
    w = operand(weight, dtype)
    wt = w.t()
    step = chunk_rows(N, V, acc.itemsize)
    buffer = x.new_empty((min(step, N), V), dtype=acc)  # one chunk's logits, reused
    loss_sum, count = 0.0, 0
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        xc, logits = x[r0:r1], buffer[:r1 - r0]
        mm(xc, wt, bias, dtype=dtype, out=logits)
        s, n, bad = rows(logits, target[r0:r1], ignore_index, label_smoothing, grad_scale,
                         None if row_scale is None else row_scale[r0:r1], grad, losses[r0:r1])
        _check(bad, target, r0, V, ignore_index)
        loss_sum, count = loss_sum + s, count + n
        if need_x:
            mm(logits, w, dtype=dtype, out=dx[r0:r1])
        if need_w:
            mm(logits.t(), xc, dtype=dtype, out=dw, accumulate=r0 > 0)
        if need_b and r0:
            db.add_(logits.sum(0))
        elif need_b:
            torch.sum(logits, 0, out=db)
    return losses, loss_sum, count, dx, dw, db


def forward(mm, rows, operand, x, weight, bias, target, ignore_index, label_smoothing, reduction, dtype,
            need_input_grad, need_weight_grad, need_bias_grad):
    """(loss, dx, dw, db): the loss as the reduction says, in loss_dtype, and for "mean" and "sum" its
    gradients in the accumulation dtype, None where not needed ("none" computes none here: its backward
    computes the chunks again with each row's incoming gradient)."""
    keep = reduction != "none"
    need_x, need_w, need_b = need_input_grad and keep, need_weight_grad and keep, need_bias_grad and keep
    target = target.contiguous()
    grad_scale = 1.0
    if reduction == "mean" and (need_x or need_w or need_b):
        # d(mean)/d(each row's loss) is 1 / the count of rows not ignored (with none, no row has a gradient)
        _, count, _ = rows(None, target, ignore_index, label_smoothing, 1.0, None, False, None)
        grad_scale = torch.where(count > 0, 1 / count, 0) if isinstance(count, torch.Tensor) else \
            1 / count if count else 0.0
    losses, loss_sum, count, dx, dw, db = _chunks(mm, rows, operand, x, weight, bias, target, ignore_index,
                                                  label_smoothing, dtype, need_x, need_w, need_b, grad_scale, None)
    out_dtype = loss_dtype(x, dtype)
    if reduction == "none":
        loss = losses.to(out_dtype)
    elif isinstance(loss_sum, torch.Tensor):  # summed on the device
        loss = (loss_sum if reduction == "sum" else loss_sum / count.to(losses.dtype)).to(out_dtype)
    else:  # summed in float64 by the kernel: divided there too, and rounded once
        loss = loss_sum if reduction == "sum" else loss_sum / count if count else math.nan  # (NaN: torch's)
        loss = torch.tensor(loss, dtype=out_dtype, device=x.device)
    return loss, dx, dw, db


def backward(mm, rows, operand, dloss, x, weight, bias, target, ignore_index, label_smoothing, dtype,
             need_input_grad, need_weight_grad, need_bias_grad):
    """(dx, dw, db) of reduction "none" for the rows' loss gradient dloss (N,): the chunks computed again
    with each row's gradient weighted by its dloss; accumulation dtype, None where not needed."""
    row_scale = dloss.to(accumulation_dtype(dtype or x.dtype)).contiguous()
    return _chunks(mm, rows, operand, x, weight, bias, target.contiguous(), ignore_index, label_smoothing, dtype,
                   need_input_grad, need_weight_grad, need_bias_grad, 1.0, row_scale)[3:]


# ---- the pieces in torch ops (the CUDA backend's) ----

def torch_operand(weight, dtype):
    return weight.to(dtype)


def torch_mm(a, b, bias=None, dtype=None, out=None, accumulate=False):
    """cpu.mm's contract in torch's matmul, on operands in the products' dtype."""
    dtype = dtype or a.dtype
    a, b = a.to(dtype), b.to(dtype)
    if accumulate:
        return out.addmm_(a, b) if out.dtype == dtype else out.add_(torch.mm(a, b))
    result = torch.mm(a, b) if bias is None else torch.addmm(bias.to(dtype), a, b)
    return result if out is None else out.copy_(result)


def torch_rows(logits, target, ignore_index, label_smoothing, grad_scale, row_scale, grad, loss):
    """The row pass in torch ops, in place over the logits. An out-of-range target fails an assertion
    on the device (no host read), in the loop's passes; the counting pass does not check."""
    valid = target != ignore_index
    if logits is None:
        return 0.0, valid.sum(), None
    V = logits.shape[1]
    t = torch.where(valid, target, 0)
    torch._assert_async(((t >= 0) & (t < V)).all(),
                        "nanofast.ops.linear_cross_entropy: a target is out of range and not ignore_index")
    m = logits.amax(1, keepdim=True)  # (NaN where a logit is, as torch's softmax gives)
    d = logits.sub_(m)
    nll = -d.gather(1, t[:, None]).squeeze(1)
    shift_sum = d.sum(1) if label_smoothing else None
    e = d.exp_()
    s = e.sum(1)
    log_s = s.log()
    nll = nll + log_s
    row = nll if not label_smoothing else (1 - label_smoothing) * nll + label_smoothing * (log_s - shift_sum / V)
    loss.copy_(torch.where(valid, row, 0))
    if grad:
        weight = (valid.to(e.dtype) if row_scale is None else torch.where(valid, row_scale, 0)) * grad_scale
        e.mul_((weight / s)[:, None])
        if label_smoothing:
            e.sub_((weight * (label_smoothing / V))[:, None])
        e.scatter_add_(1, t[:, None], (weight * -(1 - label_smoothing))[:, None])
    return loss.sum(), valid.sum(), None
