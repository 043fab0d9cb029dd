"""nanofast-compare's judging: the noise envelope's nudge (weights moved at the rounding level of a
precision) and the verdict (do two loss curves agree within the noise a nudged twin run shows?)."""
from __future__ import annotations

import math

import numpy as np
import torch

from nanofast.compare.targets import EPS


@torch.no_grad()
def nudge_(params, eps: float, generator: torch.Generator) -> None:
    """Nudge every nonzero element of `params` (float32 weights) at the level of rounding of a precision
    whose rounding unit is `eps`, in random directions drawn from `generator` (a CPU generator).

    float32 (eps = 2**-23): one ulp up or down, the next float32 either way (the smallest change).
    A lower precision (bfloat16, float16, TF32), in which autocast or the matmul rounds a float32
    weight: a uniform amount within half an ulp of that precision either way, so that the rounded
    copy comes out one ulp different about a quarter of the time (root mean square half an ulp, that
    of rounding's own error): a different rounding, as another kernel or device makes."""
    lowp = eps > EPS["float32"]
    for p in params:
        if not p.is_floating_point() or p.numel() == 0:
            continue
        _, exponent = torch.frexp(p)  # |p| = m * 2**exponent, m in [0.5, 1)
        ulp = torch.ldexp(torch.full_like(p, eps), exponent - 1)
        if lowp:
            step = (torch.rand(p.shape, generator=generator, device="cpu") - 0.5).to(device=p.device, dtype=p.dtype)
        else:
            step = torch.randint(0, 2, p.shape, generator=generator, device="cpu")
            step = step.to(device=p.device, dtype=p.dtype) * 2 - 1
        p.add_(torch.where(p == 0, torch.zeros_like(p), ulp * step))


# -----------------------------------------------------------------------------
# the verdict


def _local_max(x: np.ndarray, w: int) -> np.ndarray:
    n = len(x)
    return np.array([x[max(0, i - w):min(n, i + w + 1)].max() for i in range(n)]) if n else x


def noise_floor(losses: np.ndarray) -> np.ndarray:
    """The smallest loss difference that can be told apart: one float32 ulp of the loss (losses are
    computed in float32, also under autocast)."""
    return np.spacing(np.abs(np.asarray(losses, dtype=np.float32))).astype(np.float64)


def judge(loss_a, loss_b, loss_ref=None, loss_twin=None, tolerance: float = 10.0, window: int | None = None) -> dict:
    """Do the per-iteration losses of A and B agree within the numerical noise?

    The noise envelope is |loss_ref - loss_twin| (a run and its nudged twin), floored at one float32
    ulp of the loss. Both it and the gap |loss_a - loss_b| cross zero at random iterations, so each is
    replaced by its maximum over a window of +-`window` iterations (default: about N/20, at least 1).
    They agree while gap <= tolerance * envelope at every iteration. Returns a dict: agree (None
    without an envelope), ratio (the largest gap/envelope), worst_iter, first_bad (first iteration over
    the line, or None), gap, envelope, gap_local, envelope_local (arrays), and summary numbers."""
    a = np.asarray(loss_a, dtype=np.float64)
    b = np.asarray(loss_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"loss_a and loss_b must be 1-d and equally long, got {a.shape} and {b.shape}")
    n = len(a)
    gap = np.abs(a - b)
    out = dict(n=n, gap=gap, max_gap=float(gap.max()) if n else 0.0,
               final_gap=float(b[-1] - a[-1]) if n else 0.0,
               rms_gap=float(np.sqrt(np.mean(gap ** 2))) if n else 0.0,
               agree=None, ratio=None, worst_iter=None, first_bad=None, envelope=None, gap_local=None,
               envelope_local=None, tolerance=tolerance)
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        out.update(agree=False, ratio=math.inf, nonfinite=True,
                   first_bad=int(np.argmax(~(np.isfinite(a) & np.isfinite(b)))))
        return out
    if loss_ref is None or loss_twin is None or n == 0:
        return out
    r = np.asarray(loss_ref, dtype=np.float64)
    t = np.asarray(loss_twin, dtype=np.float64)
    if r.shape != a.shape or t.shape != a.shape:
        raise ValueError("the noise reference must be as long as the compared runs")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(t))):
        raise ValueError("the noise reference run has non-finite losses")
    w = max(1, int(round(n / 20))) if window is None else window
    env = np.maximum(np.abs(r - t), np.maximum(noise_floor(r), noise_floor(a)))
    gap_l, env_l = _local_max(gap, w), _local_max(env, w)
    ratios = gap_l / env_l
    bad = np.nonzero(ratios > tolerance)[0]
    out.update(agree=bool(len(bad) == 0), ratio=float(ratios.max()), worst_iter=int(np.argmax(ratios)),
               first_bad=int(bad[0]) if len(bad) else None, envelope=env, gap_local=gap_l, envelope_local=env_l,
               ratios=ratios, window=w, max_envelope=float(env.max()),
               rms_envelope=float(np.sqrt(np.mean(env ** 2))))
    return out


