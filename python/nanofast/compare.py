"""
nanofast-compare: train one configuration from one seed on two targets and show where they differ.

    nanofast-compare cpu cuda --iters=200                      # your CPU run against your GPU run
    nanofast-compare config/train_shakespeare_char.py cpu:float32 cpu:bfloat16 --iters=50
    nanofast-compare --targets=kernels=torch,kernels=nanofast --iters=50

It answers "is my run behind because it has done fewer steps, or because of the hardware?": both
targets start from the same weights, see the same batches and (where possible) the same dropout
masks, and take the same optimizer steps as nanofast-train (same lr schedule, gradient clipping,
AdamW, autocast, gradient accumulation). If their losses agree step for step within the numerical
noise, the same number of steps gives the same model, and the only difference is how long a step
takes. The output: a per-iteration table (both losses, their gap, the noise envelope, ms per step
of each, the speedup), a verdict, that plain-language answer, and in out_dir: compare.png (loss
against iteration and against wall-clock time, and the gap against the noise), compare.csv and
compare.json (per-iteration data and the summary).

Targets (two positional arguments, or --targets=A,B):

    TARGET  := FIELD[:FIELD...]          usually DEVICE[:DTYPE][:KERNELS]
    FIELD   := DEVICE | DTYPE | KERNELS | device=DEVICE | dtype=DTYPE | kernels=KERNELS
    DEVICE  := cpu | cuda | cuda:N | mps | auto
    DTYPE   := float32 (fp32) | bfloat16 (bf16) | float16 (fp16) | auto
    KERNELS := nanofast | torch

A field a target leaves out takes the configuration's value (--device, --dtype, --kernels; auto
means what nanofast-train picks: cuda if present, and bfloat16 on GPUs that support it, float32 on
the CPU). Examples: `cpu`, `cuda`, `cuda:1:bf16`, `cpu:bfloat16`, `cpu:float32:torch`, `torch`,
`kernels=torch`. With one target, it is compared with the configuration's own target. With none:
cpu against cuda where CUDA is present, else kernels=torch against kernels=nanofast on the CPU.

Configuration: nanoGPT's config files and --key=value overrides with nanofast-train's keys and
defaults (config/train_shakespeare_char.py is found from any directory; without a config file
nanofast-train's default one applies), plus:

    --targets=A,B    the two targets (instead of positional arguments)
    --iters=N        iterations to run (the first N of the training run the configuration describes)
    --noise=True     also run the noise reference (below); False skips it and the verdict
    --tolerance=10   how far above the noise envelope the gap may go and still count as noise

The noise envelope is measured, not assumed: the lower-precision target (the one whose arithmetic
has the larger rounding unit: bfloat16 > float16 = TF32 > float32) is trained a second time with
its weights nudged at the rounding level of that precision in random directions (float32: one unit
in the last place, ulp; lower precisions: up to half an ulp, so the rounded copy changes about a
quarter of the time): once at the start (kept), and anew for each step's forward and backward (then
undone, so that the nudges do not pile up in the weights) - the size of the rounding in which a
different kernel, summation order or device differs.
The gap between the two targets is compared, iteration by iteration (local maxima over a few
iterations, since both differences cross zero), with the gap between that run and its nudged twin:
the losses "agree" while the gap stays within `tolerance` times the envelope. Where the two
targets cannot share dropout masks (dropout > 0 across devices or kernel sets, see below), the
twin also draws other dropout masks, so the envelope is that of dropout noise.

Dropout masks: before each step of each target, torch.manual_seed is reset to the same value.
nanofast's attention kernels key their masks by a seed from torch's CPU generator, identical on
CPU and CUDA. The other dropouts (embeddings, residuals, MLP) are nanofast.ops.dropout's seeded masks
on the CPU with kernels=nanofast, and torch's otherwise, which draw from the generator of the device
they run on; kernels=torch also draws attention masks of its own. So with dropout > 0, only targets on
the same device type with the same kernel set share masks; the output says when not.

Not like nanofast-train: no evaluations or checkpoints during the run, init_from must be 'scratch',
one process (no torchrun), and each target's batch is copied to its device inside the timed step
while the CPU-side gather is shared (a small, equal cost on both).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

from nanofast.configurator import ConfigError, configure, resolve_config_file, run_cli
from nanofast.data import BatchSampler, DataError, load_meta, prepare_dataset
from nanofast.train import optimizer_step

# -----------------------------------------------------------------------------
# targets

DEVICE_WORDS = ("cpu", "cuda", "mps", "auto")
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
                 "auto": "auto"}
KERNEL_WORDS = ("nanofast", "torch")
TARGET_GRAMMAR = ("TARGET := FIELD[:FIELD...], usually DEVICE[:DTYPE][:KERNELS]; DEVICE: cpu, cuda, cuda:N, mps, "
                  "auto; DTYPE: float32 (fp32), bfloat16 (bf16), float16 (fp16), auto; KERNELS: nanofast, torch; "
                  "a field may also be written device=..., dtype=..., kernels=...")

# the unit of rounding of each precision (torch.finfo(dtype).eps; TF32 keeps float16's 10 mantissa bits)
EPS = {"float32": 2.0 ** -23, "tf32": 2.0 ** -10, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}

COMPARE_DEFAULTS = dict(
    targets='',  # 'A,B' (or two positional arguments); see the module docstring for the grammar
    iters=50,  # iterations to run on each target
    noise=True,  # measure the noise envelope (a second, nudged run of the lower-precision target)
    tolerance=10.0,  # the gap may reach this many times the noise envelope and still count as noise
)


class TargetError(ConfigError):
    """A target that cannot be parsed or cannot run here; the message says why."""


@dataclass(frozen=True)
class Target:
    """What a run executes on. Fields left as None take the configuration's values (resolve)."""
    device: str | None = None
    dtype: str | None = None
    kernels: str | None = None
    spec: str = ""

    @property
    def device_type(self):
        d = self.device or "auto"
        return "cuda" if d.startswith("cuda") else ("mps" if d.startswith("mps") else d)

    @property
    def label(self):
        return f"{self.device}:{self.dtype}:{self.kernels}"

    @property
    def precision(self):
        """The precision of its arithmetic: TF32 for float32 on CUDA (nanofast-train turns it on)."""
        if self.dtype == "float32" and self.device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            return "tf32"
        return self.dtype

    @property
    def eps(self):
        return EPS[self.precision]


def parse_target(spec: str) -> Target:
    """A Target from its text (see TARGET_GRAMMAR); fields not given are None."""
    text = spec.strip()
    if not text:
        raise TargetError(f"empty target; {TARGET_GRAMMAR}")
    fields = {}

    def put(key, value):
        if key in fields:
            raise TargetError(f"target {spec!r} gives the {key} twice ({fields[key]!r} and {value!r}); "
                              f"{TARGET_GRAMMAR}")
        fields[key] = value

    tokens = text.split(":")
    i = 0
    while i < len(tokens):
        tok = tokens[i].strip()
        low = tok.lower()
        key = None
        if "=" in tok:
            key, _, low = tok.partition("=")
            key, low = key.strip().lower(), low.strip().lower()
            if key not in ("device", "dtype", "kernels"):
                raise TargetError(f"target {spec!r}: unknown key {key!r} (the keys are device, dtype, kernels); "
                                  f"{TARGET_GRAMMAR}")
        if not low:
            raise TargetError(f"target {spec!r} has an empty field; {TARGET_GRAMMAR}")
        if key in (None, "device") and low in DEVICE_WORDS:
            value = low
            # cuda:N (and mps:N): a device index follows the device
            if i + 1 < len(tokens) and tokens[i + 1].strip().isdigit():
                if low in ("cpu", "auto"):
                    raise TargetError(f"target {spec!r}: a device index goes with cuda (cuda:N), not {low}")
                value = f"{low}:{int(tokens[i + 1])}"
                i += 1
            put("device", value)
        elif key in (None, "dtype") and low in DTYPE_ALIASES:
            put("dtype", DTYPE_ALIASES[low])
        elif key in (None, "kernels") and low in KERNEL_WORDS:
            put("kernels", low)
        elif key == "device":
            raise TargetError(f"target {spec!r}: unknown device {low!r} (devices: cpu, cuda, cuda:N, mps, auto)")
        elif key == "dtype":
            raise TargetError(f"target {spec!r}: unknown dtype {low!r} (dtypes: float32/fp32, bfloat16/bf16, "
                              f"float16/fp16, auto)")
        elif key == "kernels":
            raise TargetError(f"target {spec!r}: unknown kernel set {low!r} (kernel sets: nanofast, torch)")
        elif low.isdigit():
            raise TargetError(f"target {spec!r}: the number {low} is not after a device (write cuda:{low})")
        else:
            raise TargetError(f"target {spec!r}: {tok!r} is neither a device (cpu, cuda, cuda:N, mps, auto), "
                              f"a dtype (float32, bfloat16, float16, auto) nor a kernel set (nanofast, torch)")
        i += 1
    return Target(device=fields.get("device"), dtype=fields.get("dtype"), kernels=fields.get("kernels"), spec=text)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_target(target: Target | str, config: dict) -> Target:
    """The target with every field set (the configuration's for those left out, 'auto' resolved as
    nanofast-train does), or a TargetError if it cannot run here."""
    from nanofast.train import resolve_dtype
    if isinstance(target, str):
        target = parse_target(target)
    spec = target.spec or "(configuration)"
    device = target.device or config.get("device", "auto")
    dtype = target.dtype or config.get("dtype", "auto")
    kernels = target.kernels or config.get("kernels", "nanofast")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise TargetError(f"target {spec}: unknown dtype {dtype!r} (dtypes: float32, bfloat16, float16, auto)")
    if kernels not in KERNEL_WORDS:
        raise TargetError(f"target {spec}: unknown kernel set {kernels!r} (kernel sets: nanofast, torch)")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        device = "cuda" if cuda_available() else ("mps" if has_mps else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise TargetError(f"target {spec}: unknown device {device!r} (devices: cpu, cuda, cuda:N, mps, auto)") from None
    if dev.type == "cuda":
        if not cuda_available():
            raise TargetError(f"target {spec}: no CUDA here (torch {torch.__version__}"
                              f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'}); "
                              "compare CPU targets instead, e.g. cpu:float32 cpu:bfloat16 or kernels=torch kernels=nanofast")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TargetError(f"target {spec}: {device} does not exist ({torch.cuda.device_count()} CUDA device(s))")
        if kernels == "nanofast":
            import nanofast.kernels as K
            if not K.HAS_TRITON:
                raise TargetError(f"target {spec}: kernels=nanofast on CUDA needs triton (pip install 'nanofast[triton]'); "
                                  "or compare with kernels=torch")
    elif dev.type == "mps":
        if not has_mps:
            raise TargetError(f"target {spec}: MPS is not available here")
        if kernels == "nanofast":
            raise TargetError(f"target {spec}: nanofast's kernels run on cpu and cuda; use kernels=torch on mps")
    elif dev.type != "cpu":
        raise TargetError(f"target {spec}: unknown device {device!r} (devices: cpu, cuda, cuda:N, mps, auto)")
    dtype = resolve_dtype(dtype, dev.type)
    if dtype == "float16" and dev.type == "cpu" and kernels == "nanofast":
        raise TargetError(f"target {spec}: float16 on the CPU: nanofast's CPU kernels take float32 and bfloat16; "
                          "use bfloat16 (or kernels=torch)")
    if dtype == "bfloat16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TargetError(f"target {spec}: this GPU does not support bfloat16; use float16")
    return Target(device=device, dtype=dtype, kernels=kernels, spec=target.spec)


def split_targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def choose_targets(specs: list[str], config: dict) -> tuple[Target, Target, str]:
    """The two resolved targets for the given specs (0, 1 or 2 of them) and a note on the choice."""
    note = ""
    if len(specs) > 2:
        raise TargetError(f"two targets are compared, got {len(specs)}: {', '.join(specs)}")
    if not specs:
        if cuda_available():
            specs = ["cpu", "cuda"]
            note = "no targets given: comparing cpu with cuda"
        else:
            specs = ["kernels=torch", "kernels=nanofast"]
            note = ("no targets given and no CUDA here: comparing kernels=torch with kernels=nanofast on the CPU "
                    "(name two targets, e.g. cpu:float32 cpu:bfloat16)")
    if len(specs) == 1:
        a = resolve_target(Target(), config)
        a = Target(a.device, a.dtype, a.kernels, spec="(configuration)")
        note = f"one target given: comparing the configuration's own target ({a.label}) with it"
        return a, resolve_target(specs[0], config), note
    return resolve_target(specs[0], config), resolve_target(specs[1], config), note


def dropout_sharing(a: Target, b: Target, dropout: float) -> tuple[bool, str]:
    """Whether the two targets draw the same dropout masks, and why (not)."""
    if dropout == 0.0:
        return True, "dropout=0: no masks to share"
    reasons = []
    if a.device_type != b.device_type:
        reasons.append("the embedding, residual and MLP dropouts draw their masks differently on each device "
                       "(nanofast's seeded kernel on the CPU, torch's generator on CUDA)")
    if a.kernels != b.kernels:
        reasons.append("kernels=torch draws its own attention-dropout masks, nanofast keys them by a seed, so a "
                       "comparison of kernels=torch with kernels=nanofast cannot share masks")
    elif a.kernels == "torch" and a.device_type != b.device_type:
        reasons.append("torch's attention dropout also depends on the device")
    if reasons:
        return False, (f"dropout={dropout}: the targets cannot share dropout masks ({'; '.join(reasons)}); the noise "
                       "envelope therefore comes from a run with other masks. For a step-for-step comparison at "
                       "rounding level, add --dropout=0.0")
    return True, (f"dropout={dropout}: same masks on both targets (same device type and kernel set, torch.manual_seed "
                  "reset before every step)")


# -----------------------------------------------------------------------------
# the noise envelope's nudge: one unit in the last place of a precision, in random directions


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
            step = (torch.rand(p.shape, generator=generator) - 0.5).to(device=p.device, dtype=p.dtype)
        else:
            step = torch.randint(0, 2, p.shape, generator=generator).to(device=p.device, dtype=p.dtype) * 2 - 1
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


# -----------------------------------------------------------------------------
# one training run on one target


def _sync(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Run:
    """A model, optimizer and autocast context on one target, stepped like nanofast-train's loop."""

    def __init__(self, name, target: Target, c: dict, state_dict: dict, model_args: dict, *, seed_offset=0,
                 nudge_eps=None, nudge_seed=0):
        from nanofast.model import GPT, GPTConfig
        self.name, self.target, self.c = name, target, c
        self.device = target.device
        self.seed_offset = seed_offset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c['seed'])
            model = GPT(GPTConfig(**model_args, kernels=target.kernels))
        model.load_state_dict(state_dict)
        model.to(self.device)
        model.train()
        self.raw_model = model
        self.nudge_eps = nudge_eps
        self.nudge_gen = torch.Generator().manual_seed(nudge_seed) if nudge_eps else None
        if nudge_eps:
            nudge_(list(model.parameters()), nudge_eps, self.nudge_gen)
        ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[target.dtype]
        self.ctx = nullcontext() if ptdtype == torch.float32 else torch.amp.autocast(device_type=target.device_type,
                                                                                       dtype=ptdtype)
        self.scaler = torch.amp.GradScaler(target.device_type, enabled=(target.dtype == 'float16'))
        with contextlib.redirect_stdout(io.StringIO()):  # configure_optimizers reports what nanofast-train prints
            self.optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']),
                                                        target.device_type)
        self.model = torch.compile(model) if c['compile'] else model
        self.losses, self.step_s, self.grad_norms = [], [], []

    def _to_device(self, t):
        if self.target.device_type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def step(self, it, lr, batches, seed):
        """One optimizer step over the micro-batches `batches` (CPU tensors), with torch's generators
        seeded with `seed` (+ this run's offset) first. Records the loss (mean over micro-batches),
        the gradient norm before clipping and the step's wall-clock time."""
        c = self.c
        G = len(batches)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        saved = None
        if self.nudge_eps:  # this step's forward and backward see weights nudged anew (restored below)
            params = list(self.raw_model.parameters())
            saved = [p.detach().clone() for p in params]
            nudge_(params, self.nudge_eps, self.nudge_gen)
        torch.manual_seed(seed + self.seed_offset)
        _sync(self.device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for X, Y in batches:
            X, Y = self._to_device(X), self._to_device(Y)
            with self.ctx:
                _, loss = self.model(X, Y)
                loss = loss / G
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if saved is not None:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        norm = optimizer_step(self.model, self.optimizer, self.scaler, c['grad_clip'])
        lossf = loss_sum.item()
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.losses.append(lossf)
        self.step_s.append(dt)
        self.grad_norms.append(float(norm) if norm is not None else None)
        return lossf, dt


# -----------------------------------------------------------------------------
# the comparison


def _median(xs):
    return float(np.median(xs)) if len(xs) else float("nan")


def warmup_iters(n):
    """Iterations left out of the per-step time: the first (allocation, Triton/torch.compile
    compilation) and, in longer runs, up to 5."""
    return 0 if n <= 1 else min(5, max(1, n // 10))


def compare(config: dict, targets=None, iters=None, noise=None, tolerance=None, out_dir=None, verbose=True) -> dict:
    """Run the comparison for `config` (nanofast-train's keys plus COMPARE_DEFAULTS'; missing keys take
    their defaults). `targets`: a list of 0-2 target specs or Targets (default: config['targets']).
    Writes compare.json, compare.csv and compare.png into out_dir and returns the summary dict."""
    from nanofast.train import DEFAULTS, get_lr, validate_config
    c = dict(DEFAULTS)
    c.update(COMPARE_DEFAULTS)
    c.update(config)
    if iters is not None:
        c['iters'] = iters
    if noise is not None:
        c['noise'] = noise
    if tolerance is not None:
        c['tolerance'] = tolerance
    if out_dir is not None:
        c['out_dir'] = out_dir
    validate_config(c)
    if c['iters'] <= 0:
        raise ConfigError(f"iters must be positive, got {c['iters']}")
    if c['tolerance'] <= 0:
        raise ConfigError(f"tolerance must be positive, got {c['tolerance']}")
    if c['init_from'] != 'scratch':
        raise ConfigError(f"nanofast-compare trains from scratch; init_from={c['init_from']!r} is not supported")
    if int(os.environ.get('RANK', -1)) != -1:
        raise ConfigError("nanofast-compare runs in one process; start it without torchrun")
    log = print if verbose else (lambda *a, **k: None)

    if targets is None:
        targets = split_targets(c['targets'])
    if any(isinstance(t, Target) for t in targets):
        resolved = [resolve_target(t, c) for t in targets]
        if len(resolved) != 2:
            raise TargetError(f"two targets are compared, got {len(resolved)}")
        ta, tb, note = resolved[0], resolved[1], ""
    else:
        ta, tb, note = choose_targets(list(targets), c)
    if note:
        log(note)
    torch.backends.cuda.matmul.allow_tf32 = True  # as nanofast-train
    torch.backends.cudnn.allow_tf32 = True
    shared, dropout_note = dropout_sharing(ta, tb, c['dropout'])

    # data and vocabulary, as nanofast-train
    data_dir = prepare_dataset(c['dataset'], c['data_dir'], c['data_path'], verbose=verbose)
    meta = load_meta(data_dir)
    vocab = int(meta['vocab_size']) if meta is not None and 'vocab_size' in meta else 50304
    sampler = BatchSampler(os.path.join(data_dir, 'train.bin'), c['block_size'], seed=c['seed'], device='cpu')
    model_args = dict(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], block_size=c['block_size'],
                      bias=c['bias'], vocab_size=vocab, dropout=c['dropout'])

    # the initial weights: built once on the CPU from the seed (as nanofast-train builds them)
    from nanofast.model import GPT, GPTConfig
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c['seed'])
        ref_model = GPT(GPTConfig(**model_args, kernels='torch'))
    state = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}
    n_params = ref_model.get_num_params()
    del ref_model

    run_a = Run('A', ta, c, state, model_args)
    run_b = Run('B', tb, c, state, model_args)
    ref_name, ref_target = ('B', tb) if tb.eps > ta.eps else ('A', ta)
    twin = None
    if c['noise']:
        twin = Run(ref_name + "'", ref_target, c, state, model_args, nudge_eps=ref_target.eps,
                   nudge_seed=c['seed'] + 1, seed_offset=0 if shared else 1_000_003)
    ref_run = run_b if ref_name == 'B' else run_a

    N = c['iters']
    G, B = c['gradient_accumulation_steps'], c['batch_size']
    log(f"A = {ta.label}" + (f"  ({ta.spec})" if ta.spec else ""))
    log(f"B = {tb.label}" + (f"  ({tb.spec})" if tb.spec else ""))
    log(f"model: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} dims, block {c['block_size']}, vocab {vocab}, "
        f"{n_params / 1e6:.2f}M parameters; batch {B} x {G} micro-batches; {N} iterations from seed {c['seed']}")
    log(f"dropout masks: {dropout_note}")
    if twin is not None:
        why = f"the lower-precision target ({ref_target.precision})" if ta.eps != tb.eps else "target A"
        log(f"noise envelope: {ref_name} vs {ref_name}', {why} run again with its weights nudged at "
            f"{ref_target.precision} rounding level (at the start, and for every step's forward and backward)"
            + ("" if shared else ", and other dropout masks"))
    stride = max(1, math.ceil(N / 25))
    header = (f"{'iter':>6} {'lr':>9} {'loss A':>10} {'loss B':>10} {'gap B-A':>11} {'noise':>10} {'ms A':>9} "
              f"{'ms B':>9} {'B speedup':>9}")
    log(header)
    rows = []
    for it in range(N):
        lr = get_lr(it, c) if c['decay_lr'] else c['learning_rate']
        offsets = sampler.draw(G * B).view(G, B)
        batches = [sampler.batch(offsets[g]) for g in range(G)]
        seed = c['seed'] + 7919 * it
        order = (run_a, run_b) if it % 2 == 0 else (run_b, run_a)  # alternate, so neither always goes first
        for r in order:
            r.step(it, lr, batches, seed)
        if twin is not None:
            twin.step(it, lr, batches, seed)
        la, lb = run_a.losses[-1], run_b.losses[-1]
        noise = abs(ref_run.losses[-1] - twin.losses[-1]) if twin is not None else None
        ms_a, ms_b = run_a.step_s[-1] * 1e3, run_b.step_s[-1] * 1e3
        row = dict(iter=it, lr=lr, loss_a=la, loss_b=lb, gap=lb - la, noise=noise,
                   loss_ref=ref_run.losses[-1], loss_twin=twin.losses[-1] if twin is not None else None,
                   ms_a=ms_a, ms_b=ms_b, time_a=sum(run_a.step_s), time_b=sum(run_b.step_s),
                   grad_norm_a=run_a.grad_norms[-1], grad_norm_b=run_b.grad_norms[-1])
        rows.append(row)
        if it % stride == 0 or it == N - 1:
            ns = f"{noise:10.2e}" if noise is not None else f"{'-':>10}"
            log(f"{it:>6} {lr:9.2e} {la:10.5f} {lb:10.5f} {lb - la:+11.2e} {ns} {ms_a:9.2f} {ms_b:9.2f} "
                f"{ms_a / ms_b:8.2f}x", flush=True)

    v = judge(run_a.losses, run_b.losses, ref_run.losses if twin else None, twin.losses if twin else None,
              tolerance=c['tolerance'])
    w0 = warmup_iters(N)
    ms_a, ms_b = _median(run_a.step_s[w0:]) * 1e3, _median(run_b.step_s[w0:]) * 1e3
    speedup = ms_a / ms_b
    summary = dict(
        target_a=asdict(ta) | dict(label=ta.label, precision=ta.precision),
        target_b=asdict(tb) | dict(label=tb.label, precision=tb.precision),
        note=note, iters=N, seed=c['seed'], n_params=n_params, tokens_per_iter=G * B * c['block_size'],
        dropout=c['dropout'], masks_shared=shared, dropout_note=dropout_note,
        noise_reference=(f"{ref_name}'" if twin else None), noise_precision=ref_target.precision if twin else None,
        tolerance=c['tolerance'], agree=v['agree'], ratio=v['ratio'], worst_iter=v['worst_iter'],
        first_bad=v['first_bad'], window=v.get('window'), max_gap=v['max_gap'], rms_gap=v['rms_gap'],
        max_noise=v.get('max_envelope'), rms_noise=v.get('rms_envelope'),
        final_loss_a=run_a.losses[-1], final_loss_b=run_b.losses[-1],
        first_gap=rows[0]['gap'], first_noise=rows[0]['noise'],
        ms_per_iter_a=ms_a, ms_per_iter_b=ms_b, speedup_b_over_a=speedup, warmup_iters_excluded=w0,
        wall_s_a=sum(run_a.step_s), wall_s_b=sum(run_b.step_s), threads=torch.get_num_threads(),
    )
    summary['verdict'] = verdict_text(summary)
    summary['answer'] = answer_text(summary)
    log("")
    log(f"time per iteration (median, first {w0} left out): A {ms_a:.2f} ms, B {ms_b:.2f} ms: "
        f"B is {speedup:.2f}x {'faster' if speedup >= 1 else 'slower'} per step")
    if w0:
        log(f"first {w0} iteration(s) (allocation, compilation; not in the medians): A {sum(run_a.step_s[:w0]):.2f} s, "
            f"B {sum(run_b.step_s[:w0]):.2f} s")
    log(f"iteration 0 (same weights, same batch): gap {rows[0]['gap']:+.2e}"
        + (f", noise {rows[0]['noise']:.2e}" if rows[0]['noise'] is not None else ""))
    log("verdict: " + summary['verdict'])
    log("")
    log(summary['answer'])

    os.makedirs(c['out_dir'], exist_ok=True)
    paths = write_reports(c['out_dir'], rows, summary, c, v)
    summary['files'] = paths
    log("")
    log("written: " + ", ".join(paths.values()))
    summary['rows'] = rows
    return summary


def verdict_text(s: dict) -> str:
    if s['agree'] is None:
        return (f"no noise envelope measured (--noise=False): largest gap {s['max_gap']:.2e}, "
                f"final gap (B - A) {s['final_loss_b'] - s['final_loss_a']:+.2e}")
    kind = "rounding noise" if s['masks_shared'] else "the noise of other dropout masks"
    if s['agree']:
        return (f"AGREE: the losses agree within {kind} at every iteration (largest gap {s['max_gap']:.2e}; "
                f"at most {s['ratio']:.1f}x the envelope, {s['tolerance']:g}x allowed)")
    if s['ratio'] == math.inf:
        return f"DIFFER: a target's loss is not finite (from iteration {s['first_bad']})"
    return (f"DIFFER: the losses differ beyond {kind} from iteration {s['first_bad']} on (gap up to "
            f"{s['ratio']:.1f}x the envelope at iteration {s['worst_iter']}, {s['tolerance']:g}x allowed; largest gap "
            f"{s['max_gap']:.2e}, envelope up to {s['max_noise']:.2e})")


def _fmt_s(sec):
    if sec < 10:
        return f"{sec:.2f} s"
    return f"{sec:.1f} s" if sec < 120 else (f"{sec / 60:.1f} min" if sec < 7200 else f"{sec / 3600:.1f} h")


def answer_text(s: dict) -> str:
    """The plain-language answer to "is my run behind because of fewer steps or because of the hardware?"."""
    ta, tb = s['target_a'], s['target_b']
    a, b = ta['label'], tb['label']
    x = s['speedup_b_over_a']
    if x >= 1:
        fast, slow, f, ms_fast, ms_slow = b, a, x, s['ms_per_iter_b'], s['ms_per_iter_a']
    else:
        fast, slow, f, ms_fast, ms_slow = a, b, 1 / x, s['ms_per_iter_a'], s['ms_per_iter_b']
    differs = [k for k in ('device', 'dtype', 'kernels') if ta.get(k) != tb.get(k)] or ['nothing']
    cause = "the hardware" if "device" in differs else f"the {' and '.join(differs)}"
    speed = (f"{fast} takes {ms_fast:.2f} ms per step and {slow} {ms_slow:.2f} ms: {fast} is {f:.2f}x faster per "
             f"step, so in the same wall-clock time it does {f:.2f}x as many steps")
    n = s.get('iters')
    if n and f >= 1.05:
        speed += (f" ({n} steps take {slow} {_fmt_s(n * ms_slow / 1e3)}; in that time {fast} does about "
                  f"{n * f:,.0f})")
    q = "Is a run behind because of fewer steps or because of the hardware?\n  "
    if s['agree'] is None:
        return q + f"Not judged (no noise envelope: run with --noise=True). {speed}."
    if s['agree']:
        same = ("step for step, within rounding noise" if s['masks_shared'] else
                "step for step, as closely as different dropout masks allow")
        if f < 1.05:
            return q + (f"Neither: the losses agree {same}, and a step takes about as long on both "
                        f"({ms_fast:.2f} vs {ms_slow:.2f} ms); equal steps and equal time end alike.")
        return q + (f"Fewer steps, because of {cause}: the losses agree {same}, so the same number of steps gives "
                    f"the same model on both, and only the time per step differs. {speed}.\n  A run on {slow} that "
                    f"is behind is behind in steps only; at equal step counts it matches, and it needs {f:.2f}x the "
                    f"wall-clock time to get there.")
    return q + (f"Not only steps: the losses differ beyond the numerical noise (see the verdict), so the two targets "
                f"do not train the same model step for step, and equal numbers of steps need not give equal losses "
                f"(after {s['iters']} steps: A {s['final_loss_a']:.4f}, B {s['final_loss_b']:.4f}). Speed aside: "
                f"{speed}.")


def write_reports(out_dir, rows, summary, c, v) -> dict:
    paths = {}
    keys = list(rows[0].keys())
    p = os.path.join(out_dir, 'compare.csv')
    with open(p, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ('' if r[k] is None else r[k]) for k in keys})
    paths['csv'] = p
    p = os.path.join(out_dir, 'compare.json')
    cfg = {k: (val if isinstance(val, (int, float, str, bool, type(None))) else str(val)) for k, val in c.items()}

    def clean(x):
        return None if isinstance(x, float) and not math.isfinite(x) else x

    with open(p, 'w') as f:
        json.dump({'summary': {k: clean(val) for k, val in summary.items()}, 'config': cfg, 'iterations': rows}, f,
                  indent=1)
    paths['json'] = p
    png = plot_comparison(os.path.join(out_dir, 'compare.png'), rows, summary, v)
    if png:
        paths['png'] = png
    return paths


def plot_comparison(path, rows, s, v):
    """loss vs iteration, loss vs wall-clock seconds, and |gap| vs the noise envelope (log scale)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None
    a, b = s['target_a']['label'], s['target_b']['label']
    it = [r['iter'] for r in rows]
    fig = Figure(figsize=(16, 4.6))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(it, [r['loss_a'] for r in rows], label=f"A {a}", color="C0")
    ax1.plot(it, [r['loss_b'] for r in rows], label=f"B {b}", color="C1", linestyle="--")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("training loss")
    ax1.set_title("loss per step")
    ax2.plot([r['time_a'] for r in rows], [r['loss_a'] for r in rows], label=f"A {a}", color="C0")
    ax2.plot([r['time_b'] for r in rows], [r['loss_b'] for r in rows], label=f"B {b}", color="C1", linestyle="--")
    ax2.set_xlabel("wall-clock seconds (training steps)")
    ax2.set_ylabel("training loss")
    ax2.set_title(f"loss against time: B {s['speedup_b_over_a']:.2f}x the speed of A")
    floor = 1e-12
    ax3.semilogy(it, [max(abs(r['gap']), floor) for r in rows], label="|gap B - A|", color="C3", alpha=0.5)
    if v.get('envelope') is not None:
        ref = s['noise_reference']
        ax3.semilogy(it, np.maximum(v['envelope'], floor), label=f"noise {ref[0]} vs {ref}", color="C2", alpha=0.5)
        ax3.semilogy(it, np.maximum(v['envelope_local'] * s['tolerance'], floor),
                     label=f"{s['tolerance']:g}x noise (local max)", color="C2", linestyle=":")
        ax3.semilogy(it, np.maximum(v['gap_local'], floor), label="gap (local max)", color="C3")
    ax3.set_xlabel("iteration")
    ax3.set_ylabel("loss difference")
    verdict = "agree" if s['agree'] else ("differ" if s['agree'] is False else "not judged")
    ax3.set_title(f"gap vs numerical noise: {verdict}")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# -----------------------------------------------------------------------------
# the command line


def _is_config_file(arg):
    if arg.endswith('.py') or os.path.sep in arg:
        return True
    try:
        resolve_config_file(arg)
        return True
    except ConfigError:
        return False


def parse_args(argv):
    """(config, target specs) for command-line arguments: config files and --key=value overrides as
    nanofast-train takes them, plus targets as positional arguments or --targets=A,B."""
    from nanofast.train import DEFAULTS, DEFAULT_CONFIG_FILE, validate_config
    positional_targets, rest = [], []
    for arg in argv:
        if arg.startswith('-'):
            rest.append(arg)
        elif '=' in arg:  # kernels=torch, device=cuda:dtype=bf16
            positional_targets.append(arg)
        elif _is_config_file(arg):
            rest.append(arg)
        else:
            parse_target(arg)  # a TargetError names the grammar if it is neither a file nor a target
            positional_targets.append(arg)
    defaults = dict(DEFAULTS)
    defaults.update(COMPARE_DEFAULTS)
    config = configure(defaults, rest, default_config_file=DEFAULT_CONFIG_FILE, verbose=True, prog='nanofast-compare',
                       doc=__doc__.strip())
    validate_config(config)
    specs = split_targets(config['targets'])
    if specs and positional_targets:
        raise TargetError("give the targets either as positional arguments or as --targets=A,B, not both")
    return config, specs or positional_targets


def main(argv=None):
    """Entry point of `nanofast-compare`: 0 done (whatever the verdict), 2 bad arguments, 1 data errors."""
    argv = sys.argv[1:] if argv is None else list(argv)
    def body():
        config, specs = parse_args(argv)
        for s in specs:
            parse_target(s)
        compare(config, targets=specs)

    return run_cli('nanofast-compare', body, failures=(DataError,))  # TargetError is a ConfigError


if __name__ == '__main__':
    sys.exit(main())
