"""A plain float64 attention to test against: scores, mask, softmax, dropout mask, values."""
import math

import torch


def attention_ref(q, k, v, is_causal=False, scale=None, keep=None, p=0.0):
    """keep: optional bool (B, H, Tq, Tk) mask of kept probabilities (dropout with probability p)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        Tq, Tk = s.shape[-2:]
        visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    p_attn = torch.softmax(s, dim=-1)
    if keep is not None:
        p_attn = p_attn * keep.to(p_attn.dtype) / (1.0 - p)
    return p_attn @ v
