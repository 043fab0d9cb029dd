"""What nanofast's kernels are held to, as torch.testing is for torch: the parity rule and the float64
reference attention. The tests (tests/) and the benchmarks (bench/) both check through here.

The rule is flash-attention's: against a float64 reference, our error may be at most twice torch's
error (torch computing in the same dtype as ours) plus a small absolute slack,

    max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + atol.

The factor 2 lets a kernel round differently from torch without being worse than it; the slack covers
outputs that torch happens to compute exactly.
"""
import math

import torch

__all__ = ["ATOL", "ATOL_TRITON_GPU", "FACTOR", "assert_parity", "attention_reference", "max_error"]

FACTOR = 2.0
# The absolute slack, by the dtype of the tensor checked. A check that needs another one passes atol=
# with a comment saying why.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
# The slack of the Triton kernels compiled for a GPU, whose dots and reductions round and sum in their
# own order: their GPU checks keep this wider one. (Under Triton's interpreter they meet ATOL.)
ATOL_TRITON_GPU = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_error(t, ref64):
    """max|t - ref64|, computed in float64 (0 for an empty tensor)."""
    return (t.double() - ref64).abs().max().item() if t.numel() else 0.0


def assert_parity(name, ours, theirs, ref64, atol=None):
    """Checks the rule for one tensor: ours and theirs (torch's result in the same dtype) against the
    float64 reference ref64. Raises AssertionError naming the tensor, both errors and the bound.

    atol: the absolute slack: a number, or a table by dtype such as ATOL_TRITON_GPU; ATOL when None."""
    if ours.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)} != the reference's {tuple(ref64.shape)}")
    if ours.dtype != theirs.dtype:
        raise AssertionError(f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}")
    atol = ATOL if atol is None else atol
    atol = atol[ours.dtype] if isinstance(atol, dict) else atol
    ours_err, torch_err = max_error(ours, ref64), max_error(theirs, ref64)
    bound = FACTOR * torch_err + atol
    if not ours_err <= bound:  # (a NaN error fails too)
        raise AssertionError(
            f"{name} ({ours.dtype}): max|ours - ref64| = {ours_err:.3g} > bound {bound:.3g} = "
            f"{FACTOR:g} * max|torch - ref64| ({torch_err:.3g}) + atol {atol:g}")


def attention_reference(q, k, v, is_causal=False, scale=None, keep=None, p=0.0, attn_mask=None, window=None,
                        enable_gqa=False):
    """Textbook attention (scores, masks, softmax, dropout, values) in the inputs' dtype: the float64
    reference when given float64 inputs. As torch's scaled_dot_product_attention computes it:

    is_causal: the causal mask, top-left aligned (key j visible to query i iff j <= i);
    attn_mask: bool (True: the key takes part) or added to the scaled scores, broadcast to
    (B, H, Tq, Tk); window (nanofast's extension, with is_causal): query i sees keys i - window < j;
    key and value with fewer heads than query: grouped-query attention, query head h reading key/value
    head h // (H // Hkv) (enable_gqa is accepted for torch's signature and not needed);
    keep: optional bool (B, H, Tq, Tk) mask of the probabilities kept by dropout with probability p.

    A query that sees no key gets zeros (and zero gradients), as torch gives.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    H, Hkv = q.shape[-3], k.shape[-3]
    if Hkv != H:
        k, v = (t.repeat_interleave(H // Hkv, dim=-3) for t in (k, v))
    s = (q @ k.transpose(-2, -1)) * scale
    Tq, Tk = s.shape[-2:]
    ones = torch.ones(Tq, Tk, dtype=torch.bool, device=s.device)
    visible = ones.tril() if is_causal else ones
    if window:
        visible = visible & ones.triu(1 - window)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask.to(s.dtype)
    s = s.masked_fill(~visible, float("-inf"))
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    p_attn = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if keep is not None:
        p_attn = p_attn * keep.to(p_attn.device, p_attn.dtype) / (1.0 - p)
    return p_attn @ v
