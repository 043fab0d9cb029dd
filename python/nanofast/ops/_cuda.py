"""The CUDA side of the ops: the Triton launchers in nanofast.kernels, imported on first use so that
`import nanofast` needs neither triton nor a GPU."""


def kernels():
    try:
        from .. import kernels as k
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise RuntimeError("nanofast: CUDA tensors need the Triton kernels (pip install 'nanofast[triton]')") from e
    return k
