"""The CPU allocator setting nanofast-train runs with: keep freed memory instead of giving it back.

PyTorch's CPU tensors come from the C library's malloc. glibc hands a freed block back to the kernel
when it was mmap-ed (every block above a threshold that starts at 128 KiB and never passes 32 MiB) or
when the free space at the top of the heap grows past a trim threshold. A training step frees and
reallocates the same activations every iteration, so with the defaults each iteration page-faults its
tensors in again, 4 KiB at a time: hundreds to thousands of faults a step, dear on a VM, and at
nanoGPT's GPU config, whose activations are all mmap-ed blocks of tens of MB, a large share of a
memory-bound kernel's time (`pytest --benchmark -k allocator` measures the lever).

`retain_freed_memory()` makes glibc serve every block from the heap and never trim it, so a process
keeps its peak memory and reuses it. It is process-wide and cannot be undone, so nanofast-train calls
it for CPU runs (--retain_memory), and a library user calls it at the start of a training script. It
does nothing where the C library is not glibc (macOS, musl).
"""
from . import _C

_retained = False


def retain_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed memory in the process. Returns True if the
    C library took the setting (glibc), False otherwise."""
    global _retained
    _retained = bool(_C.retain_freed_memory()) or _retained
    return _retained


def is_retaining() -> bool:
    """Whether retain_freed_memory() has taken effect in this process."""
    return _retained
