"""A run started on the CPU and resumed on CUDA, against the same run on CUDA from the start (run by
bench/gpu_check.sh).

Three nanofast-train runs of one config, same seed, same data order (the batch sampler's state
travels in the checkpoint):
    cpu      iterations 0..SPLIT on the CPU, which saves its checkpoint at SPLIT
    resumed  --init_from=resume from that checkpoint, on CUDA, up to END
    cuda     0..END on CUDA from scratch
The table gives, for each iteration after SPLIT, the training loss of `resumed` and `cuda` and their
gap. Both see the same batches; they start from weights that differ by the CPU's and the GPU's
rounding over SPLIT steps, and (with dropout) draw other dropout masks, so the losses follow each
other within the step-to-step noise rather than bit for bit.

Usage: python bench/resume_check.py --data_path=input.txt --out=resume.md [nanofast-train --key=value ...]
"""
import argparse
import re
import statistics
import subprocess
import sys

LOSS = re.compile(r"^iter (\d+): loss ([0-9.]+)", re.M)


def train(args, out_dir, extra):
    cmd = [sys.executable, "-m", "nanofast.train", *args, f"--out_dir={out_dir}", *extra]
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"resume_check: nanofast-train failed ({p.returncode})")
    return {int(i): float(v) for i, v in LOSS.findall(p.stdout)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="resume.md")
    ap.add_argument("--work", default="/tmp/nanofast-resume")
    ap.add_argument("--split", type=int, default=20)
    ap.add_argument("--end", type=int, default=40)
    ap.add_argument("--resume_device", default="cuda", help="cpu: check this script on a machine without a GPU")
    a, rest = ap.parse_known_args(argv)
    common = ["config/train_shakespeare_char.py", "--compile=False", "--log_interval=1", "--eval_iters=2",
              f"--eval_interval={a.split}", "--always_save_checkpoint=True", f"--lr_decay_iters={a.end}",
              "--warmup_iters=5", *rest]
    train(common, f"{a.work}/run", ["--device=cpu", f"--max_iters={a.split}"])
    resumed = train(common, f"{a.work}/run", [f"--device={a.resume_device}", "--init_from=resume",
                                              f"--max_iters={a.end}"])
    cuda = train(common, f"{a.work}/cuda", [f"--device={a.resume_device}", f"--max_iters={a.end}"])
    its = [i for i in sorted(resumed) if i > a.split and i in cuda]
    gaps = [abs(resumed[i] - cuda[i]) for i in its]
    lines = ["| iteration | resumed from the CPU | CUDA from scratch | gap |", "|---|---|---|---|"]
    lines += [f"| {i} | {resumed[i]:.4f} | {cuda[i]:.4f} | {resumed[i] - cuda[i]:+.4f} |" for i in its]
    summary = (f"nanofast-train {' '.join(common)}: iterations 0-{a.split} on the CPU, resumed on CUDA to {a.end}, "
               f"against CUDA from scratch. Mean |gap| {statistics.mean(gaps):.4f}, max {max(gaps):.4f} over "
               f"{len(its)} iterations; the loss itself moved from {cuda[its[0]]:.4f} to {cuda[its[-1]]:.4f}."
               if its else "no iterations to compare (see the log)")
    with open(a.out, "w") as f:
        f.write(summary + "\n\n" + "\n".join(lines) + "\n")
    print(summary)
    print("\n".join(lines))
    return 0 if its else 1


if __name__ == "__main__":
    sys.exit(main())
