"""Training-step benchmark: one optimizer step (forward, backward, gradient clipping, AdamW step) of
nanoGPT's CPU config (4 layers, 4 heads, 128 dims, block 64, batch 12) and GPU config (6 layers, 6 heads,
384 dims, block 256, batch 64, dropout 0.2), vocabulary 65 (shakespeare_char), with kernels=nanofast and
kernels=torch, float32 and bfloat16 (autocast, as nanofast-train does), on the CPU and (where present)
CUDA. Run with `pytest --benchmark -k train`.

The step is nanofast-train's: the model in training mode (dropout on), AdamW from
GPT.configure_optimizers (nanofast.optim.AdamW for kernels=nanofast on the CPU, torch's fused AdamW
otherwise), the gradient norm clipped at 1.0 (training.optimizer_step), zero_grad(set_to_none).
Before timing, each case checks that kernels=nanofast and kernels=torch give the same loss on the
same batch and weights (dropout off for the check: the two kernel sets draw different masks).

The report's rate is thousands of tokens per second (batch * block per step): `work` is tokens
* 1e6 because the report divides by 1e9. Its time column is milliseconds per step.
"""
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch

from conftest import timed

from nanofast.model import GPT, GPTConfig
from nanofast.testing import assert_parity
from nanofast.training import optimizer_step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB = 65
CONFIGS = {
    "cpu-config": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0),
    "gpu-config": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2),
}
# the loss of the same batch with either kernel set (float32: rounding only; bfloat16: autocast rounds
# each kernel's inputs and outputs, and the two kernel sets round at different places)
LOSS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _model(cfg, kernels, device):
    args = {k: v for k, v in cfg.items() if k != "batch_size"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1337)  # the same initial weights for both kernel sets
        model = GPT(GPTConfig(**args, vocab_size=VOCAB, bias=False, kernels=kernels))
    return model.to(device)


def _batch(cfg, device):
    g = torch.Generator().manual_seed(0)
    B, T = cfg["batch_size"], cfg["block_size"]
    data = torch.randint(VOCAB, (B, T + 1), generator=g)
    return data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)


def _autocast(device, dtype):
    return nullcontext() if dtype == torch.float32 else torch.amp.autocast(device_type=device, dtype=dtype)


@contextlib.contextmanager
def _tf32(device):
    """nanofast-train turns TF32 on for CUDA matmuls; restore the setting afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def _eval_loss(model, X, Y, device, dtype):
    model.eval()
    with _autocast(device, dtype):
        _, loss = model(X, Y)
    model.train()
    return float(loss)


VARIANTS = [(dtype, provider) for dtype in (torch.float32, torch.bfloat16) for provider in ("nanofast", "torch")]


def _step_fn(cfg, device, dtype, provider, X, Y, fused_blocks=True):
    """nanofast-train's step for one variant, after checking its loss against torch's kernels.
    fused_blocks=False runs nanofast's kernels one autograd node per op (GPT.use_fused_blocks)."""
    model = _model(cfg, provider, device).use_fused_blocks(fused_blocks)
    if provider != "torch":  # the same loss as torch's kernels on the same batch and weights
        ref = _model(cfg, "torch", device)
        ours, theirs = _eval_loss(model, X, Y, device, dtype), _eval_loss(ref, X, Y, device, dtype)
        del ref
        assert abs(ours - theirs) <= LOSS_RTOL[dtype] * abs(theirs), \
            f"loss with kernels={provider}, {dtype}: {ours:.7f}, with torch's: {theirs:.7f}"
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device)
    model.train()
    ctx = _autocast(device, dtype)
    scaler = torch.amp.GradScaler(device, enabled=False)

    def step():
        with ctx:
            _, loss = model(X, Y)
        loss.backward()
        optimizer_step(model, optimizer, scaler, 1.0)
    return step


def _alternate(steps, sync=lambda: None, seconds_per_round=0.15):
    """({variant: median seconds per step}, rounds): the variants take turns, round after round (15 of
    about 0.15 s each, or 3 of one step where a step is longer), so that a drift of the machine's speed
    hits all alike."""
    for step in steps.values():  # warm-up
        step()
        sync()
    t0 = time.perf_counter()
    next(iter(steps.values()))()
    sync()
    per_round = max(1, int(seconds_per_round / (time.perf_counter() - t0)))
    rounds = 15 if per_round > 1 else 3
    times = {v: [] for v in steps}
    for _ in range(rounds):
        for v, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                step()
            sync()
            times[v].append((time.perf_counter() - t0) / per_round)
    return {v: statistics.median(ts) for v, ts in times.items()}, rounds


@pytest.mark.parametrize("device,config", [(d, c) for d in DEVICES for c in CONFIGS],
                         ids=[f"train-{d}-{c}" for d in DEVICES for c in CONFIGS])
def test_train_step(record, device, config):
    """The four variants (float32/bfloat16 x nanofast/torch kernels) take turns, round after round, so a
    drift of the machine's speed hits all alike; each variant's time is its median round."""
    cfg = CONFIGS[config]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with _tf32(device):
        X, Y = _batch(cfg, device)
        steps = {v: _step_fn(cfg, device, *v, X, Y) for v in VARIANTS}
        torch.manual_seed(0)
        times, rounds = _alternate(steps, sync)
    tokens = cfg["batch_size"] * cfg["block_size"]
    L, H, C, T, B = cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"], cfg["batch_size"]
    case = f"{config} {L}L {H}H {C}d B{B} T{T}" + (f" dropout {cfg['dropout']}" if cfg["dropout"] else "")
    for (dtype, provider), seconds in times.items():
        record.seconds(seconds, rounds, op="train step", case=case, mode="fwd+bwd+clip+AdamW",
                       dtype=dtype, provider=provider, device=device, work=tokens * 1e6, unit="ktok/s")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", ["shakespeare", "gpt2-124m"], ids=["train-cuda-modes-shakespeare",
                                                                     "train-cuda-modes-gpt2-124m"])
def test_train_step_cuda_modes(record, config):
    """A whole GPU step in every mode (bench/gpu_train_bench.py: torch and nanofast, eager, compiled, CUDA
    graphs), bfloat16; each nanofast mode's ratio is against torch's kernels in the same mode (torch
    compiled is nanoGPT's own setup)."""
    import gpu_train_bench

    rows = []
    gpu_train_bench.run_config(config, gpu_train_bench.MODES, time.time() + 900, rows.append)
    cfg = gpu_train_bench.CONFIGS[config]
    for r in rows:  # mode names are "<kernels> <how>": each nanofast row is paired with torch's in its mode
        assert "wall_ms" in r, r
        provider, how = r["mode"].split(" ", 1)
        record.seconds(r["wall_ms"] / 1e3, 5, op="train step (GPU modes)", case=config, mode=how,
                       dtype=torch.bfloat16, provider=provider, device="cuda",
                       work=cfg["batch_size"] * cfg["block_size"] * 1e6, unit="ktok/s")
        print(f"{config} {r['mode']}: host {r['host_ms']:.2f} ms, GPU {r['gpu_ms']:.2f} ms per step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_block_lever(record, dtype):
    """The hand-written block (nanofast/fused_block.py: one autograd node per transformer block)
    against the same kernels recorded op by op, at the CPU config where autograd's bookkeeping
    weighs most. Both must give the same loss and gradients (tests/test_fused_block.py)."""
    cfg = CONFIGS["cpu-config"]
    X, Y = _batch(cfg, "cpu")
    # "with": fused blocks; "without": the same kernels, one autograd node per op
    steps = {side: _step_fn(cfg, "cpu", dtype, "nanofast", X, Y, fused_blocks=side == "with")
             for side in ("with", "without")}
    times, rounds = _alternate(steps)
    for side, seconds in times.items():
        record.seconds(seconds, rounds, op="train step: fused blocks", case="cpu-config kernels=nanofast",
                       mode="fwd+bwd+clip+AdamW", dtype=dtype, provider=side, device="cpu",
                       work=cfg["batch_size"] * cfg["block_size"] * 1e6, unit="ktok/s")


# The allocator lever (nanofast.allocator.retain_freed_memory) is process-wide and permanent, so each
# side runs in a fresh interpreter: warm-up steps, then the best of a few rounds, in seconds per step.
_STEP_IN_A_FRESH_PROCESS = r"""
import contextlib, json, sys, time
import torch
import nanofast.allocator
from nanofast.model import GPT, GPTConfig
from nanofast.testing import assert_parity
from nanofast.training import optimizer_step
retain, dtype, kernels = sys.argv[1] == "with", getattr(torch, sys.argv[2]), sys.argv[3]
cfg, warmup, rounds, per_round = json.loads(sys.argv[4]), *map(int, sys.argv[5:8])
if retain:
    assert nanofast.allocator.retain_freed_memory()
torch.manual_seed(1337)
B = cfg.pop("batch_size")
model = GPT(GPTConfig(**cfg, vocab_size=65, bias=False, kernels=kernels))
opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
g = torch.Generator().manual_seed(0)
X, Y = (torch.randint(65, (B, cfg["block_size"]), generator=g) for _ in range(2))
ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.amp.autocast("cpu", dtype=dtype)
scaler = torch.amp.GradScaler("cpu", enabled=False)
def step():
    with ctx:
        _, loss = model(X, Y)
    loss.backward()
    optimizer_step(model, opt, scaler, 1.0)
for _ in range(warmup):
    step()
best = float("inf")
for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(per_round):
        step()
    best = min(best, (time.perf_counter() - t) / per_round)
print(best)
"""
# (warm-up steps, rounds, steps per round): the GPU config takes seconds per step on the CPU
ALLOCATOR_RUNS = {"cpu-config": (10, 5, 20), "gpu-config": (1, 2, 1)}
ALLOCATOR_CASES = [("cpu-config", k, d) for k in ("nanofast", "torch") for d in (torch.float32, torch.bfloat16)] + \
                  [("gpu-config", "torch", torch.float32), ("gpu-config", "nanofast", torch.bfloat16)]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="retain_freed_memory acts on glibc malloc")
@pytest.mark.parametrize("config,kernels,dtype", ALLOCATOR_CASES,
                         ids=[f"{c}-{k}-{str(d)[6:]}" for c, k, d in ALLOCATOR_CASES])
def test_allocator_lever(record, config, kernels, dtype):
    """The two sides alternate (twice each at the CPU config) and each keeps its best process, so a
    drift of the machine's speed does not pass for the lever's effect."""
    cfg = CONFIGS[config]
    best = {}
    for side in ("without", "with") * (2 if config == "cpu-config" else 1):
        p = subprocess.run([sys.executable, "-c", _STEP_IN_A_FRESH_PROCESS, side, str(dtype)[6:], kernels,
                            json.dumps(cfg), *map(str, ALLOCATOR_RUNS[config])],
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr
        best[side] = min(best.get(side, float("inf")), float(p.stdout.strip().splitlines()[-1]))
    for side, seconds in best.items():
        record.seconds(seconds, ALLOCATOR_RUNS[config][1], op="train step: retain_freed_memory",
                       case=f"{config} kernels={kernels}", mode="fwd+bwd+clip+AdamW", dtype=dtype, provider=side,
                       device="cpu", work=cfg["batch_size"] * cfg["block_size"] * 1e6, unit="ktok/s")


def _check_optimizer_parity(cfg, model, optimizer):
    """Two clipped steps of nanofast.optim.AdamW against torch's AdamW in float32 and in float64, from
    the same weights and gradients: the flash-attention rule on every parameter."""
    def two_steps(dtype, make):
        m = _model(cfg, "torch", "cpu").to(dtype)
        m.load_state_dict(model.state_dict())
        params = [p for p in m.parameters() if p.requires_grad]
        opt = make(m)
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            if isinstance(opt, torch.optim.AdamW):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            else:
                opt.step(max_grad_norm=1.0)
        return params

    ours = two_steps(torch.float32, lambda m: type(optimizer)(
        [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99)))
    theirs = two_steps(torch.float32, lambda m: m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu"))
    ref = two_steps(torch.float64, lambda m: m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu"))
    for i, (o, t, r) in enumerate(zip(ours, theirs, ref)):
        # a slack tighter than the float32 default: AdamW is elementwise arithmetic (plus one norm),
        # so ours rounds almost as torch does
        assert_parity(f"AdamW param {i} {tuple(o.shape)}", o.detach(), t.detach(), r.detach(), atol=1e-7)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("provider", ["nanofast", "torch"])
def test_optimizer_step(benchmark, record, config, provider):
    """The optimizer lever alone: clip the gradient norm at 1.0 and step AdamW over the model's
    parameters (nanofast.optim.AdamW in one call; torch's clip_grad_norm_ and fused AdamW). Rate: the
    bytes AdamW must move (parameter, moments read and written, gradient read twice: 36 B/parameter)."""
    cfg = CONFIGS[config]
    model = _model(cfg, provider, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    if provider == "nanofast":
        _check_optimizer_parity(cfg, model, optimizer)

    def step():
        if provider == "nanofast":
            optimizer.step(max_grad_norm=1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)

    timed(benchmark, step, "cpu")
    n = sum(p.numel() for p in params)
    record(benchmark, op="optimizer step", case=f"{config} {n / 1e6:.2f}M params", mode="clip+AdamW",
           dtype=torch.float32, provider=provider, device="cpu", work=36 * n, unit="GB/s")


# The fused loss lever (GPT.use_fused_loss: lm_head and the cross-entropy a chunk of rows at a time with
# nanofast.ops.linear_cross_entropy, against lm_head's logits then F.cross_entropy), in a fresh
# interpreter per side: a small forward+backward (which loads the code paths), then the peak resident
# set size reset (/proc/self/clear_refs) and one forward+backward at the full batch, whose growth of the
# peak over the resident size before it is the memory figure (activations, logits and gradients; glibc's
# default malloc); then training steps, the best of a few rounds in seconds per step.
_FUSED_LOSS_STEP = r"""
import contextlib, json, sys, time
import torch
from nanofast.model import GPT, GPTConfig
from nanofast.training import optimizer_step
fused, dtype = sys.argv[1] == "with", getattr(torch, sys.argv[2])
cfg, warmup, rounds = json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
B, vocab = cfg.pop("batch_size"), cfg.pop("vocab_size")
torch.manual_seed(1337)
model = GPT(GPTConfig(**cfg, vocab_size=vocab, bias=False, kernels="nanofast")).use_fused_loss(fused)
opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
ctx = contextlib.nullcontext if dtype == torch.float32 else lambda: torch.amp.autocast("cpu", dtype=dtype)
scaler = torch.amp.GradScaler("cpu", enabled=False)
g = torch.Generator().manual_seed(0)
X, Y = (torch.randint(vocab, (B, cfg["block_size"]), generator=g) for _ in range(2))
def kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
def forward_backward(x, y):
    with ctx():
        _, loss = model(x, y)
    loss.backward()
    return loss.detach()
forward_backward(X[:1, :16], Y[:1, :16])
model.zero_grad(set_to_none=True)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kib("VmRSS")
loss = float(forward_backward(X, Y))
peak = (kib("VmHWM") - base) * 1024
optimizer_step(model, opt, scaler, 1.0)
def step():
    forward_backward(X, Y)
    optimizer_step(model, opt, scaler, 1.0)
for _ in range(warmup):
    step()
best = float("inf")
for _ in range(rounds):
    t = time.perf_counter()
    step()
    best = min(best, time.perf_counter() - t)
print(json.dumps(dict(peak=peak, seconds=best, loss=loss)))
"""
FUSED_LOSS_CONFIGS = {
    "gpu-config": dict(CONFIGS["gpu-config"], vocab_size=VOCAB),
    # GPT-2 124M's shape and vocabulary at a small batch: B * T = 1024
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=128, batch_size=8, dropout=0.0, vocab_size=50304),
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("config", list(FUSED_LOSS_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_loss_lever(record, config, dtype):
    """kernels=nanofast on the CPU with the fused loss ("with") and without: time per step and the peak
    memory of a forward+backward. The sides alternate, each twice, and keep their best process; the
    first forward+backward of each must give the same loss on both sides."""
    cfg = FUSED_LOSS_CONFIGS[config]
    best, peak, losses = {}, {}, {}
    for side in ("without", "with") * 2:
        p = subprocess.run([sys.executable, "-c", _FUSED_LOSS_STEP, side, str(dtype)[6:], json.dumps(cfg), "1", "2"],
                           capture_output=True, text=True, timeout=1800)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        best[side] = min(best.get(side, float("inf")), out["seconds"])
        peak[side] = min(peak.get(side, float("inf")), out["peak"])
        losses[side] = out["loss"]
    assert abs(losses["with"] - losses["without"]) <= LOSS_RTOL[dtype] * abs(losses["without"]), losses
    L, H, C, T, B = (cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size"))
    case = f"{config} {L}L {C}d B{B} T{T} vocab {cfg['vocab_size']}"
    for side in best:
        record.seconds(best[side], 2, op="train step: fused loss", case=case, mode="fwd+bwd+clip+AdamW",
                       dtype=dtype, provider=side, device="cpu", work=B * T * 1e6, unit="ktok/s",
                       peak_bytes=peak[side])
