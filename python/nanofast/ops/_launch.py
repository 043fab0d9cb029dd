"""Which launchers serve a tensor: the C++ kernels for CPU tensors, Triton for CUDA tensors."""
from . import _cpu, _cuda


def launchers(t):
    return _cuda.kernels() if t.is_cuda else _cpu
