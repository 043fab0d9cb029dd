"""nanofast.optim.AdamW: torch.optim.AdamW for CPU float32 parameters, one C++ call per step.

At nanoGPT's CPU config torch's AdamW (even fused=True) and clip_grad_norm_ spend most of their time in
Python and dispatch around a few dozen small tensors. Here step() hands every parameter to one C++/OpenMP
kernel (csrc/adamw.h), and step(max_grad_norm=...) clips the global gradient norm inside the same call,
so a training loop replaces

    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()

with `optimizer.step(max_grad_norm=grad_clip)`. The gradients themselves are left unscaled (the update
uses the clipped values).

The arithmetic is torch.optim.AdamW's (decoupled weight decay, bias correction, eps outside the square
root), the state is torch's too ('step', 'exp_avg', 'exp_avg_sq' per parameter, the same param_group
keys), so state_dicts move between the two in either direction.
"""
import torch

from . import _C
from .ops import cpu


def _is_cpu_float32(p):
    return isinstance(p, torch.Tensor) and p.device.type == "cpu" and p.dtype == torch.float32


def _check_param(p):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"nanofast.optim.AdamW: parameters must be tensors, got {type(p).__name__}")
    if not _is_cpu_float32(p):
        raise ValueError(f"nanofast.optim.AdamW: runs on CPU float32 parameters, got a {p.dtype} parameter of shape "
                         f"{tuple(p.shape)} on {p.device} (use torch.optim.AdamW(fused=True) on a GPU)")


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        for name, value, ok in (("lr", lr, lambda v: v >= 0.0), ("eps", eps, lambda v: v >= 0.0),
                                ("weight_decay", weight_decay, lambda v: v >= 0.0),
                                ("betas[0]", betas[0], lambda v: 0.0 <= v < 1.0),
                                ("betas[1]", betas[1], lambda v: 0.0 <= v < 1.0)):
            if isinstance(value, torch.Tensor) or not ok(float(value)):
                raise ValueError(f"nanofast.optim.AdamW: invalid {name}: {value!r}")
        # torch.optim.AdamW's keys, so its load_state_dict takes ours; only these values are supported
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False,
                        foreach=None, capturable=False, differentiable=False, fused=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                _check_param(p)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            _check_param(p)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch keeps 'step' as a float32 scalar tensor (or a number in old checkpoints): the kernel
        # advances it in place, so make each one a float32 scalar tensor of its own
        for state in self.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device="cpu")

    def _tensors(self):
        """The kernel's arguments: 5 pointers, a size and 5 settings per parameter that has a gradient."""
        ptrs, sizes, settings = [], [], []
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
                raise ValueError("nanofast.optim.AdamW: amsgrad, maximize and differentiable are not supported")
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr = lr.item()
            beta1, beta2 = group["betas"]
            hyper = (float(lr), float(group["weight_decay"]), float(beta1), float(beta2), float(group["eps"]))
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.dtype != torch.float32 or g.shape != p.shape:
                    raise ValueError(f"nanofast.optim.AdamW: the gradient of a parameter of shape {tuple(p.shape)} "
                                     f"must be a dense float32 tensor of that shape, got {g.dtype} {tuple(g.shape)}"
                                     + (" (sparse)" if g.is_sparse else ""))
                if not p.is_contiguous():
                    raise ValueError(f"nanofast.optim.AdamW: parameters must be contiguous (shape {tuple(p.shape)}, "
                                     f"strides {p.stride()})")
                if not g.is_contiguous():
                    g = p.grad = g.contiguous()
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device="cpu")
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                ptrs += (p.data_ptr(), g.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
                         state["step"].data_ptr())
                sizes.append(p.numel())
                settings += hyper
        return ptrs, sizes, settings

    @torch.no_grad()
    def step(self, closure=None, *, max_grad_norm=None):
        """One AdamW step over every parameter with a gradient. With max_grad_norm (> 0), first scale the
        gradients as torch.nn.utils.clip_grad_norm_(params, max_grad_norm) would, and return the norm
        before clipping as a float32 tensor (as clip_grad_norm_ does); otherwise return closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if max_grad_norm is not None and not (float(max_grad_norm) > 0.0):
            raise ValueError(f"nanofast.optim.AdamW.step: max_grad_norm must be positive, got {max_grad_norm!r}")
        ptrs, sizes, settings = self._tensors()
        clip = float(max_grad_norm) if max_grad_norm is not None else 0.0
        norm = _C.adamw_step(ptrs, sizes, settings, clip, cpu.threads()) if sizes else 0.0
        return loss if max_grad_norm is None else torch.tensor(norm, dtype=torch.float32, device="cpu")

    @staticmethod
    def supports(params):
        """Whether every parameter is one this optimizer takes (CPU float32)."""
        return all(_is_cpu_float32(p) for p in params)


__all__ = ["AdamW"]
