"""nanofast-compare's targets: what a run executes on (device, dtype, kernel set), parsed from text
such as `cuda:1:bf16` or `kernels=torch`, completed from the configuration, checked against what this
machine has, and whether two targets can share dropout masks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanofast.configurator import ConfigError
from nanofast.training import device_type_of, has_mps, precision_error, resolve_device, resolve_dtype

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
        return "auto" if self.device in (None, "auto") else device_type_of(self.device)

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
    if device == "auto":
        device = resolve_device("auto")
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
        if not has_mps():
            raise TargetError(f"target {spec}: MPS is not available here")
        if kernels == "nanofast":
            raise TargetError(f"target {spec}: nanofast's kernels run on cpu and cuda; use kernels=torch on mps")
    elif dev.type != "cpu":
        raise TargetError(f"target {spec}: unknown device {device!r} (devices: cpu, cuda, cuda:N, mps, auto)")
    dtype = resolve_dtype(dtype, dev.type)
    unsupported = precision_error(dtype, dev.type, kernels)
    if unsupported:
        raise TargetError(f"target {spec}: {unsupported}; use bfloat16 (or kernels=torch)")
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
        return require_distinct(a, resolve_target(specs[0], config)) + (note,)
    return require_distinct(resolve_target(specs[0], config), resolve_target(specs[1], config)) + (note,)


def require_distinct(a: Target, b: Target) -> tuple[Target, Target]:
    """(a, b), or a TargetError where the two resolved targets are the same: such a comparison could only
    show a run against itself, and its speed ratio only timing noise."""
    if a.label == b.label:
        raise TargetError(f"both targets are {a.label} ({a.spec or 'the configuration'} and {b.spec or 'the configuration'}"
                          f"): they differ in nothing, so there is nothing to compare; name two that differ in device, "
                          f"dtype or kernels, e.g. cpu:float32 cpu:bfloat16 or kernels=torch kernels=nanofast")
    return a, b


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


