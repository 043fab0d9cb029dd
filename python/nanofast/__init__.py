"""nanofast: fused LayerNorm and attention kernels (C++/OpenMP on the CPU, Triton on CUDA) behind a
nanoGPT-style model and training loop."""
__version__ = "0.1.0"

from ._compile_cache import tag_compile_caches  # noqa: E402

tag_compile_caches()  # before any graph that calls nanofast's ops is compiled (see _compile_cache.py)

from . import allocator, nn, ops, optim  # noqa: E402
from .patch import patch, unpatch  # noqa: E402

__all__ = ["ops", "nn", "optim", "allocator", "patch", "unpatch", "__version__"]
