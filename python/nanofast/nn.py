"""Modules built on nanofast.ops."""
import torch

from . import ops
from .ops.checks import layer_norm_served


class LayerNorm(torch.nn.LayerNorm):
    """A drop-in for torch.nn.LayerNorm (same constructor arguments and state_dict keys) that runs
    nanofast's fused kernels; tensors they do not take (float16 on the CPU, other devices, bfloat16 rows
    beside float32 parameters on the CPU) go to torch's, so that nanofast.patch never breaks a model."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.is_floating_point() and not layer_norm_served(input, self.weight, self.bias):
            return super().forward(input)
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class Linear(torch.nn.Linear):
    """A drop-in for torch.nn.Linear (same constructor arguments and state_dict keys) that runs
    nanofast.ops.linear: nanofast's float32 GEMM on CPUs with AVX-512, torch's matmul elsewhere."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.linear(input, self.weight, self.bias)


class Dropout(torch.nn.Dropout):
    """A drop-in for torch.nn.Dropout that runs nanofast.ops.dropout on CPU tensors: masks from a
    counter-based generator keyed by a seed from torch's generator, on all threads, not stored for the
    backward. (`inplace` is accepted and ignored: the result is a new tensor.)"""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.dropout(input, self.p, self.training)


class Conv1D(torch.nn.Module):
    """transformers' Conv1D (GPT-2's projections: y = x @ weight + bias with weight (in, out)) on
    nanofast.ops.linear, with its attributes and state_dict keys; nanofast.patch puts it in place of
    transformers' own."""

    def __init__(self, nf: int, nx: int, device=None, dtype=None):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = torch.nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.linear(input, self.weight.t(), self.bias)
