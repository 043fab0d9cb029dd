"""Dropout seeds, shared by attention, dropout and the fused block.

A seed is a one-element int64 tensor, what a custom op can take and autograd can save, drawn from
torch's generator of the device it will be used on, so torch.manual_seed makes dropout reproducible.
The kernels derive each element's mask from (seed, element offset), so the backward needs nothing but
the seed, and the same seed value gives the same mask on every device.

On CUDA the seed stays on the GPU and the Triton kernels read it from memory: drawing it there costs
no host synchronisation, a compiled graph records the draw as a device op, and a CUDA graph replays a
fresh draw each step (a seed passed as a number would be baked into the graph: the same mask every
step). The C++ kernels take the value (seed_value) from a CPU tensor.
"""
from typing import Optional, Union

import torch
from torch import Tensor

# Drawn seeds stay below this bound; the kernels themselves take any 64-bit value.
SEED_BOUND = 2**62


def draw_seed(device: Optional[torch.device] = None) -> Tensor:
    """A fresh dropout seed from the generator of `device` (default: the CPU, whatever torch's default
    device), kept on that device."""
    return torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64, device="cpu" if device is None else device)


def seed_value(seed: Optional[Union[Tensor, int]]) -> int:
    """The seed as the launchers pass it to a kernel: 0 for None (no dropout)."""
    return 0 if seed is None else int(seed)
