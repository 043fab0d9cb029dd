"""Memory layouts shared by the CPU and CUDA launchers and the fake (torch.compile) implementations,
which must agree on them stride for stride; and how the launchers read an attention mask in place."""
import torch


def empty_bthd(B, NH, T, D, like):
    """A (B, NH, T, D) tensor laid out as (B, T, NH, D): the layout nanoGPT transposes back into, so
    the `y.transpose(1, 2).contiguous()` after attention costs nothing."""
    return torch.empty(B, T, NH, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def empty_grad_like(t):
    """An empty gradient for the (B, NH, T, D) input t: in t's own layout where t is dense with a unit
    last stride, so that autograd keeps it as, or adds it to, t's .grad without a strided copy
    (nanoGPT's q, k and v are (B, T, NH, D) in memory); else (B, T, NH, D)."""
    if t.stride(-1) == 1 and _dense(t):
        return torch.empty_like(t)  # keeps a dense tensor's strides
    return empty_bthd(*t.shape, t)


def _dense(t):
    """True when t's elements fill one block of memory without gaps or overlaps, in any dim order."""
    if t.is_contiguous() or (t.dim() == 4 and t.transpose(1, 2).is_contiguous()):
        return True  # the usual two layouts, (B, NH, T, D) and nanoGPT's (B, T, NH, D), without the sort
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def unit_last_stride(t):
    """t, or a packed copy where its last dimension is strided: the kernels need that one packed, the
    other strides are free."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def mask_strides(mask, B, H, Tq, Tk):
    """The element strides with which the kernels read `mask` (2-D to 4-D, broadcastable to
    (B, H, Tq, Tk), as torch's scaled_dot_product_attention broadcasts it) as a (B, H, Tq, Tk) tensor:
    0 along every broadcast dim, so the broadcast is never materialised."""
    n = mask.dim()
    sizes, strides = (1,) * (4 - n) + tuple(mask.shape), (0,) * (4 - n) + tuple(mask.stride())
    return tuple(0 if size == 1 else stride for size, stride in zip(sizes, strides))


def empty_rows_like(t, dtype):
    """An empty tensor of t's shape in dtype, in t's layout where t is dense (a rotary embedding keeps
    q's (B, T, H, D) memory, as torch's elementwise ops do), contiguous where that layout would not
    have a unit last stride."""
    out = torch.empty_like(t, dtype=dtype)
    return out if out.stride(-1) == 1 or out.shape[-1] <= 1 else torch.empty(t.shape, dtype=dtype, device=t.device)
