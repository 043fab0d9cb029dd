"""Modules built on nanofast.ops."""
import torch

from . import ops
from .ops.checks import layer_norm_served, served
from .ops.rms_norm import rms_norm_reference


class LayerNorm(torch.nn.LayerNorm):
    """A drop-in for torch.nn.LayerNorm (same constructor arguments and state_dict keys) that runs
    nanofast's fused kernels; tensors they do not take (float16 on the CPU, other devices, bfloat16 rows
    beside float32 parameters on the CPU) go to torch's, so that nanofast.patch never breaks a model."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.is_floating_point() and not layer_norm_served(input, self.weight, self.bias):
            return super().forward(input)
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """A drop-in for torch.nn.RMSNorm (same constructor arguments and state_dict keys) that runs
    nanofast's kernels; what they do not take (other tensors, a weight of another dtype than the input's)
    goes to torch's functions. The keyword-only weight_offset and
    cast_before_weight select the models' other roundings (nanofast.ops.rms_norm): Hugging Face's
    LlamaRMSNorm is RMSNorm(C, eps, cast_before_weight=True), Gemma's RMSNorm(C, eps, weight_offset=1.0)
    (whose weight then starts at zero: Gemma's checkpoints hold w for (1 + w))."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 weight_offset=0.0, cast_before_weight=False):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.weight_offset = float(weight_offset)
        self.cast_before_weight = bool(cast_before_weight)
        if elementwise_affine and self.weight_offset:
            with torch.no_grad():
                self.weight.fill_(1.0 - self.weight_offset)  # the same initial scale of 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.is_floating_point() and (not served(input) or (self.weight is not None and
                                                                self.weight.dtype != input.dtype)):
            if not (self.weight_offset or self.cast_before_weight):
                return super().forward(input)
            x = input.flatten(-len(self.normalized_shape))
            w = None if self.weight is None else self.weight.reshape(-1)
            eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
            return rms_norm_reference(x, w, eps, self.weight_offset, self.cast_before_weight).view(input.shape)
        return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps, weight_offset=self.weight_offset,
                            cast_before_weight=self.cast_before_weight)

    def extra_repr(self):
        extra = "".join(f", {k}={getattr(self, k)}" for k in ("weight_offset", "cast_before_weight") if getattr(self, k))
        return super().extra_repr() + extra


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


class GELU(torch.nn.GELU):
    """A drop-in for torch.nn.GELU (the erf form, or approximate='tanh': GPT-2's "gelu_new") on
    nanofast.ops.gelu."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.gelu(input, approximate=self.approximate)
