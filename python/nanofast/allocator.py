"""The CPU allocator setting nanofast-train runs with: keep freed memory instead of giving it back.

PyTorch's CPU tensors come from the C library's malloc. glibc hands a freed block back to the kernel
when it was mmap-ed (blocks above a threshold that starts at 128 KiB) or when the free space at the top
of the heap grows past a trim threshold. A training step frees and reallocates the same activations
every iteration, so with the defaults each iteration page-faults its tensors in again, 4 KiB at a
time: on the dev machine (a VM, where faults are dear) nanoGPT's CPU config took 700-2700 faults per
step and the bfloat16 step ran about 25% slower for it.

`retain_freed_memory()` is process-wide and cannot be undone (glibc stops adapting its threshold once
one is set), so nanofast-train calls it for CPU runs, and a library user calls it at the start of a
training script. It does nothing where the C library is not glibc (macOS, musl).
"""
from . import _C

# glibc caps the mmap threshold at half its heap size (32 MiB on 64-bit): larger blocks are mmap-ed
MMAP_THRESHOLD = 32 << 20
# the free memory a process may keep at the top of its heap before glibc trims it
TRIM_THRESHOLD = 1 << 30

_retained = False


def retain_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Serve blocks up to `mmap_threshold` bytes from the heap and keep up to `trim_threshold` bytes of
    freed heap. Returns True if the C library took the setting (glibc), False otherwise."""
    global _retained
    for name, value, top in (("mmap_threshold", mmap_threshold, MMAP_THRESHOLD),
                             ("trim_threshold", trim_threshold, (1 << 31) - 1)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
            raise ValueError(f"nanofast.allocator.retain_freed_memory: {name} must be an int in [0, {top}], "
                             f"got {value!r}")
    _retained = bool(_C.retain_freed_memory(mmap_threshold, trim_threshold))
    return _retained


def is_retaining() -> bool:
    """Whether retain_freed_memory() has taken effect in this process."""
    return _retained
