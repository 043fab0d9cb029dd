"""The flash-attention parity rule: our error against a float64 reference may be at most twice
torch's error (torch computing in the same dtype as ours) plus a tiny absolute slack."""
import torch

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def max_err(t, ref64):
    return (t.double() - ref64).abs().max().item() if t.numel() else 0.0


def assert_parity(name, ours, theirs, ref64, atol=None):
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    atol = ATOL[ours.dtype] if atol is None else atol
    ours_err, torch_err = max_err(ours, ref64), max_err(theirs, ref64)
    assert ours_err <= 2 * torch_err + atol, (
        f"{name}: max|ours - ref64| = {ours_err:.3g} > 2 * max|torch - ref64| ({torch_err:.3g}) + {atol:g}")


def all_isas():
    """Every instruction-set build of the C++ kernels this CPU can run."""
    from nanofast import _C

    return _C.available_isas().split(",")
