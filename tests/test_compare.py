"""nanofast-compare: target parsing and errors, the verdict on synthetic loss curves, the noise nudge,
and one tiny end-to-end comparison (kernels=torch against kernels=nanofast on the CPU)."""
import json
import math

import numpy as np
import pytest
import torch

from nanofast import compare as cmp
from nanofast.compare import Target, TargetError, judge, parse_target, resolve_target

from test_train import write_corpus

HAS_CUDA = torch.cuda.is_available()
CFG = dict(device="auto", dtype="auto", kernels="nanofast")


# ----------------------------------------------------------------------------------------------
# targets


@pytest.mark.parametrize("spec,expect", [
    ("cpu", Target("cpu", None, None)),
    ("cuda", Target("cuda", None, None)),
    ("cuda:1", Target("cuda:1", None, None)),
    ("cuda:1:bf16", Target("cuda:1", "bfloat16", None)),
    ("cpu:bfloat16", Target("cpu", "bfloat16", None)),
    ("cpu:float32:torch", Target("cpu", "float32", "torch")),
    ("kernels=torch", Target(None, None, "torch")),
    ("torch", Target(None, None, "torch")),
    ("fp32:cpu", Target("cpu", "float32", None)),
    ("device=cpu:dtype=bf16:kernels=nanofast", Target("cpu", "bfloat16", "nanofast")),
    ("device=cuda:0", Target("cuda:0", None, None)),
    (" CPU:FP16 ", Target("cpu", "float16", None)),
])
def test_parse_target(spec, expect):
    t = parse_target(spec)
    assert (t.device, t.dtype, t.kernels) == (expect.device, expect.dtype, expect.kernels)


@pytest.mark.parametrize("spec,words", [
    ("tpu", ["tpu", "neither a device"]),
    ("device=tpu", ["unknown device", "tpu"]),
    ("cpu:float8", ["float8"]),
    ("dtype=float8", ["unknown dtype", "float8"]),
    ("kernels=triton", ["unknown kernel set", "triton"]),
    ("cpu:cuda", ["device twice"]),
    ("cpu:fp32:bf16", ["dtype twice"]),
    ("cpu:3", ["cuda:N"]),
    ("", ["empty target"]),
    ("cpu::torch", ["empty field"]),
    ("colour=red", ["unknown key"]),
])
def test_bad_targets(spec, words):
    with pytest.raises(TargetError) as e:
        parse_target(spec)
    for w in words:
        assert w in str(e.value)


def test_resolve_fills_from_config():
    t = resolve_target("kernels=torch", dict(CFG, device="cpu", dtype="bfloat16"))
    assert (t.device, t.dtype, t.kernels) == ("cpu", "bfloat16", "torch")
    t = resolve_target("cpu", CFG)
    assert (t.device, t.dtype, t.kernels) == ("cpu", "float32", "nanofast")  # auto -> float32 on the CPU
    assert t.label == "cpu:float32:nanofast" and t.precision == "float32"


def test_resolve_errors():
    with pytest.raises(TargetError, match="float16 on the CPU"):
        resolve_target("cpu:fp16:nanofast", CFG)
    assert resolve_target("cpu:fp16:torch", CFG).dtype == "float16"  # torch's kernels take it
    with pytest.raises(TargetError, match="unknown kernel set"):
        resolve_target(Target("cpu", "float32", "tvm"), CFG)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message where there is no CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(TargetError, match="no CUDA"):
        resolve_target("cuda", CFG)
    with pytest.raises(TargetError, match="no CUDA"):
        resolve_target("cuda:1:bf16", CFG)
    # the default pair without CUDA compares kernel sets on the CPU
    a, b, note = cmp.choose_targets([], CFG)
    assert (a.kernels, b.kernels, a.device, b.device) == ("torch", "nanofast", "cpu", "cpu")
    assert "no CUDA" in note


def test_choose_targets():
    with pytest.raises(TargetError, match="two targets"):
        cmp.choose_targets(["cpu", "cpu", "cpu"], CFG)
    a, b, note = cmp.choose_targets(["cpu:bf16"], dict(CFG, device="cpu"))
    assert a.label == "cpu:float32:nanofast" and b.label == "cpu:bfloat16:nanofast" and "configuration" in note


def test_dropout_sharing():
    cpu, cpu_t = Target("cpu", "float32", "nanofast"), Target("cpu", "float32", "torch")
    cpu_bf = Target("cpu", "bfloat16", "nanofast")
    gpu = Target("cuda", "bfloat16", "nanofast")
    assert cmp.dropout_sharing(cpu, cpu_t, 0.0)[0]
    shared, note = cmp.dropout_sharing(cpu, cpu_t, 0.2)
    assert not shared and "kernels=torch" in note and "cannot share" in note
    assert not cmp.dropout_sharing(cpu, gpu, 0.2)[0]
    assert cmp.dropout_sharing(cpu, cpu_bf, 0.2)[0]


def test_precision_order():
    assert Target("cpu", "bfloat16", "nanofast").eps > Target("cpu", "float32", "nanofast").eps
    assert cmp.EPS["bfloat16"] == torch.finfo(torch.bfloat16).eps
    assert cmp.EPS["float32"] == torch.finfo(torch.float32).eps


def test_nudge_is_at_rounding_level():
    p = torch.randn(1000) * 10.0 ** torch.randint(-4, 4, (1000,))
    p[:10] = 0.0
    q = p.clone()
    cmp.nudge_([q], cmp.EPS["float32"], torch.Generator().manual_seed(0))
    up, down = torch.nextafter(p, torch.tensor(math.inf)), torch.nextafter(p, torch.tensor(-math.inf))
    moved = p != 0
    assert torch.all((q[moved] == up[moved]) | (q[moved] == down[moved]))
    assert torch.all(q[:10] == 0)
    assert 300 < int((q == up).sum()) < 700  # both directions
    b = p.clone()
    cmp.nudge_([b], cmp.EPS["bfloat16"], torch.Generator().manual_seed(0))
    rel = ((b - p) / p.abs())[moved]
    assert torch.all(rel.abs() <= 2.0 ** -8 * 1.001)  # within half a bfloat16 ulp
    assert rel.abs().mean() > 2.0 ** -10 and (rel > 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    # rounded to bfloat16, about a quarter of the weights change
    changed = (b.bfloat16() != p.bfloat16())[moved].float().mean().item()
    assert 0.15 < changed < 0.35


# ----------------------------------------------------------------------------------------------
# the verdict on synthetic curves


def _curves(n=200, seed=0, noise=1e-6):
    """A falling loss curve, and chaotic-looking divergence: differences that start at `noise` and
    grow (as rounding differences do in training)."""
    rng = np.random.default_rng(seed)
    base = 4.2 * np.exp(-np.arange(n) / 80) + 1.5 + 0.05 * rng.standard_normal(n)
    growth = noise * np.exp(np.arange(n) / 50)

    def twin():
        return base + growth * rng.standard_normal(n)

    return base, twin


def test_judge_agrees_within_noise():
    base, twin = _curves()
    a, b, t = base, twin(), twin()
    v = judge(a, b, a, t, tolerance=10.0)
    assert v["agree"] is True and v["first_bad"] is None and v["ratio"] < 10


def test_judge_flags_a_small_systematic_offset():
    base, twin = _curves()
    b = base + 1e-4  # e.g. a kernel that is slightly off: far below the loss scale, far above rounding
    v = judge(base, b, base, twin(), tolerance=10.0)
    assert v["agree"] is False and v["first_bad"] == 0 and v["ratio"] > 10


def test_judge_flags_a_late_divergence():
    base, twin = _curves(noise=1e-7)
    b = twin()
    b[150:] += np.linspace(0, 0.05, 50)  # e.g. a learning-rate schedule that differs late in the run
    v = judge(base, b, base, twin(), tolerance=10.0)
    assert v["agree"] is False and 140 <= v["first_bad"] <= 155


def test_judge_identical_and_nonfinite_and_no_reference():
    base, _ = _curves()
    v = judge(base, base.copy(), base, base.copy())  # bitwise equal everything: the float32-ulp floor
    assert v["agree"] is True and np.all(v["envelope"] > 0)
    b = base.copy()
    b[7] = np.nan
    v = judge(base, b, base, base)
    assert v["agree"] is False and v["first_bad"] == 7
    v = judge(base, base + 1)
    assert v["agree"] is None and v["max_gap"] == pytest.approx(1)
    with pytest.raises(ValueError):
        judge(base, base[:-1])


def test_answer_texts():
    s = dict(target_a=dict(label="cpu:float32:nanofast", device="cpu", dtype="float32", kernels="nanofast"),
             target_b=dict(label="cuda:bfloat16:nanofast", device="cuda", dtype="bfloat16", kernels="nanofast"),
             speedup_b_over_a=25.0, ms_per_iter_a=250.0, ms_per_iter_b=10.0, agree=True, masks_shared=True,
             iters=100, final_loss_a=2.0, final_loss_b=2.0, wall_s_a=25.0, wall_s_b=1.0)
    text = cmp.answer_text(s)
    assert "Fewer steps, because of the hardware" in text and "25.00x" in text
    assert "in that time" in text and "about 2,500" in text
    s["target_b"] = dict(s["target_a"], label="cpu:float32:torch", kernels="torch")
    assert "because of the kernels" in cmp.answer_text(s)
    s["speedup_b_over_a"] = 1.01
    assert "Neither" in cmp.answer_text(s)
    s["agree"] = False
    assert "Not only steps" in cmp.answer_text(s)


# ----------------------------------------------------------------------------------------------
# end to end


def test_compare_end_to_end(tmp_path, capsys):
    text = write_corpus(tmp_path / "tiny.txt")
    out = tmp_path / "out"
    argv = ["--dataset=tiny", f"--data_path={text}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}",
            "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
            "--gradient_accumulation_steps=1", "--dropout=0.0", "--compile=False", "--device=cpu",
            "--learning_rate=3e-3", "--warmup_iters=2", "--lr_decay_iters=100", "--max_iters=100",
            "--iters=10", "kernels=torch", "kernels=nanofast"]
    assert cmp.main(argv) == 0
    printed = capsys.readouterr().out
    assert "AGREE" in printed and ("Fewer steps, because of the kernels" in printed or "Neither" in printed)
    for name in ("compare.json", "compare.csv", "compare.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "compare.json").read_text())
    s = data["summary"]
    assert s["agree"] is True and s["target_a"]["label"] == "cpu:float32:torch"
    assert s["target_b"]["label"] == "cpu:float32:nanofast" and s["masks_shared"]
    rows = data["iterations"]
    assert len(rows) == 10 and rows[0]["iter"] == 0
    assert rows[-1]["loss_a"] < rows[0]["loss_a"]  # it trained
    for r in rows:
        assert abs(r["loss_a"] - r["loss_b"]) < 1e-3
    assert (out / "compare.csv").read_text().splitlines()[0].startswith("iter,lr,loss_a,loss_b,gap")


def test_cli_errors(tmp_path, capsys):
    assert cmp.main(["tpu", "cpu"]) == 2
    assert "neither a device" in capsys.readouterr().err
    assert cmp.main(["--targets=cpu,cpu:float8"]) == 2
    assert "float8" in capsys.readouterr().err
    assert cmp.main(["--targets=cpu,cpu", "cpu"]) == 2
    assert cmp.main(["--iters=0", "--targets=cpu,cpu"]) == 2
