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

# The package by job: targets.py (the TARGET grammar, resolution, dropout sharing), judging.py (the
# nudge and the verdict), running.py (the runs, step for step), reporting.py (what is printed and
# written), cli.py (the command line).
from nanofast.compare.cli import main, parse_args
from nanofast.compare.judging import judge, noise_floor, nudge_
from nanofast.compare.reporting import answer_text, verdict_text, write_reports
from nanofast.compare.running import COMPARE_DEFAULTS, Run, compare, warmup_iters
from nanofast.compare.targets import (EPS, Target, TargetError, choose_targets, dropout_sharing, parse_target,
                                      resolve_target, split_targets)

__all__ = ["COMPARE_DEFAULTS", "EPS", "Run", "Target", "TargetError", "answer_text", "choose_targets", "compare",
           "dropout_sharing", "judge", "main", "noise_floor", "nudge_", "parse_args", "parse_target", "resolve_target",
           "split_targets", "verdict_text", "warmup_iters", "write_reports"]
