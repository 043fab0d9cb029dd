"""Helpers shared by the Triton launchers: device checks, block-size heuristics' inputs.

Importing this module imports triton; ``nanofast.kernels`` imports it lazily.
"""
import contextlib
import functools

import torch


def is_interpreted(jit_fn) -> bool:
    """True when ``jit_fn`` was decorated while TRITON_INTERPRET=1, i.e. it runs on CPU tensors in numpy.

    Triton decides this once, when the kernel is decorated, so asking the kernel object is the only
    reliable test (the environment variable may have changed since).
    """
    return type(jit_fn).__name__ == "InterpretedFunction"


def check_device(name: str, t: torch.Tensor, interpreted: bool) -> None:
    """Raise a clear error for tensors the compiled kernels cannot address."""
    if t.is_cuda:
        if interpreted:
            raise RuntimeError(
                f"{name} is a CUDA tensor but Triton was imported with TRITON_INTERPRET=1, which runs "
                "kernels on CPU tensors only; unset TRITON_INTERPRET to use the GPU")
        return
    if t.device.type == "cpu" and interpreted:
        return
    raise RuntimeError(
        f"{name} is on {t.device}: the Triton kernels run on CUDA tensors (or on CPU tensors when "
        "TRITON_INTERPRET=1 is set before nanofast.kernels is imported); nanofast.ops runs the C++ "
        "kernels on CPU tensors")


def device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_hint(t: torch.Tensor) -> int:
    """How many programs keep the device busy: a few per SM on a GPU, a handful in the interpreter."""
    if t.is_cuda:
        return 4 * sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4


def direct(kernel):
    """The launchers' default `launch`: the kernel itself. Inside a torch.library.triton_op the ops
    pass torch.library.wrap_triton instead, so that torch.compile records the launch."""
    return kernel


# Plain Python rather than triton.cdiv and triton.next_power_of_2: those are constexpr functions
# whose call wrapper costs microseconds, and a launch calls them several times.
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()
