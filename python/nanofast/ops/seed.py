"""Dropout seeds, shared by attention, dropout and the fused block.

A seed is drawn from torch's CPU generator, so torch.manual_seed makes dropout reproducible, and is
carried as a one-element int64 tensor: what a custom op can take and autograd can save. The kernels
derive each element's mask from (seed, element offset), so the backward needs nothing but the seed.
"""
from typing import Optional, Union

import torch
from torch import Tensor

# Drawn seeds stay below this bound; the kernels themselves take any 64-bit value.
SEED_BOUND = 2**62


def draw_seed() -> Tensor:
    """A fresh dropout seed from torch's CPU generator."""
    return torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64)


def seed_value(seed: Optional[Union[Tensor, int]]) -> int:
    """The seed as the launchers pass it to a kernel: 0 for None (no dropout)."""
    return 0 if seed is None else int(seed)
