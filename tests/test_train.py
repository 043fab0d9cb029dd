"""nanofast-train and nanofast-sample: configuration, the training loop, checkpoints, resume, Ctrl-C."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nanofast
from nanofast import _C
from nanofast import sample as sample_mod
from nanofast import train
from nanofast.checkpoint import CheckpointError, load_checkpoint
from nanofast.configurator import ConfigError
from nanofast.data import DEFAULT_DATASET
from nanofast.metrics import read_jsonl

ISSUE_COMMAND = ("config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 "
                 "--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 "
                 "--lr_decay_iters=2000 --dropout=0.0")
PYTHONPATH = str(Path(nanofast.__file__).resolve().parents[1])


# ----------------------------------------------------------------------------------------------
# helpers (also used by test_train_ddp.py)

def write_corpus(path):
    """~60 KB of structured text a tiny model learns quickly."""
    rng = random.Random(0)
    words = ["the", "king", "queen", "shall", "speak", "my", "lord", "good", "night", "sweet", "love", "death",
             "and", "of", "to", "thee", "thou", "art"]
    lines = []
    for _ in range(2000):
        who = rng.choice(["KING", "QUEEN", "FOOL"])
        lines.append(f"{who}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) + rng.choice(".,!?") + "\n")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d / "tiny.txt"), d / "data"


def tiny_config(out_dir, corpus, **kw):
    text, data_dir = corpus
    c = dict(out_dir=str(out_dir), dataset="tiny", data_dir=str(data_dir), data_path=str(text),
             n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, gradient_accumulation_steps=1,
             max_iters=10, eval_interval=5, eval_iters=2, log_interval=1, learning_rate=3e-3, min_lr=3e-4,
             warmup_iters=2, lr_decay_iters=100, dropout=0.0, bias=False, compile=False, device="cpu",
             dtype="float32", kernels="torch", peak_flops=1e11, always_save_checkpoint=True, beta2=0.99)
    c.update(kw)
    return c


def as_argv(config):
    return [f"--{k}={v}" for k, v in config.items()]


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_jsonl(Path(out_dir) / "metrics.jsonl") if r["kind"] == "train"}


# ----------------------------------------------------------------------------------------------
# configuration

def test_issue_command_parses_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config file is found among nanofast's own
    c = train.get_config(ISSUE_COMMAND.split())
    expect = dict(out_dir="out-shakespeare-char", eval_interval=250, eval_iters=20, log_interval=1,
                  always_save_checkpoint=False, dataset="shakespeare_char", gradient_accumulation_steps=1,
                  batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False,
                  learning_rate=1e-3, max_iters=2000, lr_decay_iters=2000, min_lr=1e-4, beta2=0.99,
                  warmup_iters=100, device="cpu", compile=False, dtype="auto", kernels="nanofast",
                  init_from="scratch", weight_decay=0.1, beta1=0.9, grad_clip=1.0, decay_lr=True,
                  wandb_log=False, backend="nccl")
    for k, v in expect.items():
        assert c[k] == v and type(c[k]) is type(v), k
    assert set(c) == set(train.DEFAULTS)


def test_nanogpt_keys_and_defaults():
    d = train.DEFAULTS
    nanogpt = dict(out_dir="out", eval_interval=2000, log_interval=1, eval_iters=200, eval_only=False,
                   always_save_checkpoint=True, init_from="scratch", wandb_log=False, wandb_project="owt",
                   wandb_run_name="gpt2", dataset="openwebtext", gradient_accumulation_steps=40, batch_size=12,
                   block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=False,
                   learning_rate=6e-4, max_iters=600000, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                   decay_lr=True, warmup_iters=2000, lr_decay_iters=600000, min_lr=6e-5, backend="nccl",
                   compile=True)
    for k, v in nanogpt.items():
        assert d[k] == v, k
    assert d["device"] == "auto" and d["dtype"] == "auto" and d["kernels"] == "nanofast"


def test_no_arguments_is_a_small_model_on_the_default_corpus(capsys):
    c = train.get_config([])
    assert c["dataset"] == DEFAULT_DATASET and c["compile"] is False
    assert (c["n_layer"], c["n_head"], c["n_embd"], c["block_size"], c["batch_size"]) == (4, 4, 128, 64, 12)
    assert c["max_iters"] <= 2000 and c["eval_iters"] <= 50
    assert "train_default.py" in capsys.readouterr().out
    # overrides apply on top of it
    c = train.get_config(["--max_iters=7"])
    assert c["max_iters"] == 7 and c["dataset"] == DEFAULT_DATASET


def test_values_are_typed():
    c = train.get_config(["--learning_rate=1", "--max_iters=2e3", "--compile=false", "--out_dir=2024",
                          "--dtype=bfloat16"])
    assert c["learning_rate"] == 1.0 and type(c["learning_rate"]) is float
    assert c["max_iters"] == 2000 and type(c["max_iters"]) is int
    assert c["compile"] is False and c["out_dir"] == "2024" and c["dtype"] == "bfloat16"
    c = train.get_config(["--init_from=resume", "--device=cuda:1", "--bias=True", "--data_path=/a=b.txt"])
    assert c["init_from"] == "resume" and c["device"] == "cuda:1" and c["bias"] is True
    assert c["data_path"] == "/a=b.txt"


@pytest.mark.parametrize("argv, pattern", [
    (["--batch_sise=3"], r"unknown config key 'batch_sise'.*Did you mean batch_size.*Valid keys: out_dir, "),
    (["--batch_size=abc"], r"batch_size must be a int"),
    (["--batch_size=1.5"], r"batch_size must be a int"),
    (["--compile=3"], r"compile must be a bool"),
    (["--learning_rate=fast"], r"learning_rate must be a float"),
    (["--batch_size", "3"], r"--key=value"),
    (["no_such_config.py"], r"config file 'no_such_config.py' not found.*train_shakespeare_char.py"),
    (["--n_embd=100", "--n_head=3"], r"multiple of n_head"),
    (["--kernels=triton"], r"kernels must be one of"),
    (["--dtype=fp8"], r"dtype must be"),
    (["--compile_mode=fast"], r"compile_mode must be one of"),
])
def test_bad_arguments_are_clear_errors(argv, pattern, capsys):
    with pytest.raises(ConfigError, match=f"(?s){pattern}"):
        train.get_config(argv)
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanofast-train: error:") and "Traceback" not in err


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 8\nlearnin_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="(?s)unknown config key 'learnin_rate'.*set in config file.*Valid keys"):
        train.get_config([str(bad)])
    bad.write_text("n_layer = 'four'\n")
    with pytest.raises(ConfigError, match="n_layer must be a int"):
        train.get_config([str(bad)])
    ok = tmp_path / "ok.py"
    ok.write_text("import math\n_helper = 3\nmax_iters = 100\nlr_decay_iters = max_iters\nn_layer = 2 * _helper\n")
    c = train.get_config([str(ok), "--max_iters=5"])
    assert c["lr_decay_iters"] == 100 and c["n_layer"] == 6 and c["max_iters"] == 5
    c = train.get_config(["train_shakespeare_char"])  # by bare name too
    assert c["dataset"] == "shakespeare_char"


def test_help(capsys):
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--gradient_accumulation_steps" in out and "train_shakespeare_char.py" in out


def test_lr_schedule():
    c = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000)
    assert train.get_lr(0, c) == pytest.approx(1e-3 / 101)
    assert train.get_lr(99, c) == pytest.approx(1e-3 * 100 / 101)
    assert train.get_lr(100, c) == pytest.approx(1e-3)
    assert train.get_lr(1050, c) == pytest.approx(1e-4 + 0.5 * 0.9e-3)
    assert train.get_lr(2000, c) == pytest.approx(1e-4)
    assert train.get_lr(5000, c) == 1e-4


def test_device_and_dtype_resolution():
    dev = train.resolve_device("auto")
    if torch.cuda.is_available():
        assert dev == "cuda"
    elif not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        assert dev == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train.resolve_device("cuda")
    assert train.resolve_dtype("auto", "cpu") == "float32"
    assert train.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert train.resolve_dtype("auto", "mps") == "float32"


# ----------------------------------------------------------------------------------------------
# training

@pytest.mark.parametrize("kernels", ["torch", "nanofast"])
def test_short_training_loss_falls(tmp_path, corpus, kernels):
    c = tiny_config(tmp_path / "out", corpus, max_iters=40, eval_interval=20, eval_iters=4, kernels=kernels,
                    learning_rate=1e-2, lr_decay_iters=40, min_lr=1e-3)
    r = train.run(c)
    (i0, tr0, va0), (_, _, va1), (i2, tr2, va2) = r["evals"]
    assert (i0, i2) == (0, 40)
    assert math.isclose(va0, math.log(r_vocab(c)), rel_tol=0.1)
    assert va2 < va0 - 1.0 and tr2 < tr0 - 1.0, r["evals"]
    assert r["losses"][-1][1] < r["losses"][0][1] - 1.0
    out = tmp_path / "out"
    # metrics, plot, checkpoint
    recs = read_jsonl(out / "metrics.jsonl")
    assert [x["iter"] for x in recs if x["kind"] == "train"] == list(range(41))
    assert [x["iter"] for x in recs if x["kind"] == "eval"] == [0, 20, 40]
    assert {"loss", "dt_ms", "step_ms", "tok_per_s", "mfu", "lr"} <= set(recs[-1])
    assert recs[-1]["mfu"] > 0 and recs[-1]["tok_per_s"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["iter_num"] == 41 and ck["best_val_loss"] == pytest.approx(va2)  # the final state, saved at the end
    assert set(ck["model_args"]) == {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}
    assert {"model", "optimizer", "config", "rng", "rng_per_rank", "meta"} <= set(ck)
    assert set(ck["rng"]) >= {"python", "numpy", "torch_cpu", "cuda", "sampler"}
    assert ck["config"]["kernels"] == kernels
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # and sampling from it
    buf = __import__("io").StringIO()
    samples = sample_mod.sample(dict(out_dir=str(out), start="KING:", num_samples=2, max_new_tokens=30,
                                     device="cpu", kernels=kernels), out=buf)
    assert len(samples) == 2 and all(s.startswith("KING:") and len(s) == 35 for s in samples)
    assert buf.getvalue().count("---------------") == 2


def r_vocab(c):
    return len(set(Path(c["data_path"]).read_text()))


@pytest.mark.parametrize("kernels", ["torch", "nanofast"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus, kernels):
    kw = dict(kernels=kernels, dropout=0.1, gradient_accumulation_steps=2, max_iters=10, eval_interval=4)
    full = train.run(tiny_config(tmp_path / "full", corpus, **kw))
    # stopped after iteration 5, with its checkpoint from the evaluation at 4 (val loss improved)
    first = train.run(tiny_config(tmp_path / "part", corpus, **{**kw, "max_iters": 5}, always_save_checkpoint=False))
    assert torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["iter_num"] == 4
    resumed = train.run(tiny_config(tmp_path / "part", corpus, **kw, init_from="resume"))
    full_losses = dict(full["losses"])
    assert [i for i, _ in resumed["losses"]] == list(range(4, 11))
    for i, loss in resumed["losses"]:
        assert loss == full_losses[i], (i, loss, full_losses[i])  # bitwise
    assert first["losses"] == full["losses"][:6]
    assert resumed["evals"] == [e for e in full["evals"] if e[0] >= 4]
    # the metrics file holds each iteration once
    iters = [r["iter"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl") if r["kind"] == "train"]
    assert iters == list(range(11))
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_a_gpu_checkpoint_on_the_cpu(tmp_path, corpus, capsys):
    """What a checkpoint written on a GPU brings along (CUDA random states, a float16 GradScaler's state)
    does not stop it from resuming on the CPU."""
    c = tiny_config(tmp_path / "o", corpus, max_iters=4)
    train.run(c)
    path = tmp_path / "o" / "ckpt.pt"
    ck = torch.load(path, weights_only=True)
    for st in [ck["rng"]] + ck["rng_per_rank"]:
        st["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    ck["scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                    "_growth_tracker": 3}
    ck["config"]["device"], ck["config"]["dtype"] = "cuda", "float16"
    torch.save(ck, path)
    capsys.readouterr()
    r = train.run({**c, "init_from": "resume", "max_iters": 7})
    assert [i for i, _ in r["losses"]] == [5, 6, 7]
    if not torch.cuda.is_available():
        assert "CUDA random states were not restored" in capsys.readouterr().out


def test_resume_a_nanogpt_checkpoint(tmp_path, corpus, capsys):
    """A checkpoint as nanoGPT's train.py writes it (compiled model's keys, no random states)."""
    c = tiny_config(tmp_path / "o", corpus, max_iters=4)
    train.run(c)
    path = tmp_path / "o" / "ckpt.pt"
    ck = torch.load(path, weights_only=True)
    nano = {"model": {"_orig_mod." + k: v for k, v in ck["model"].items()}, "optimizer": ck["optimizer"],
            "model_args": ck["model_args"], "iter_num": ck["iter_num"],
            "best_val_loss": torch.tensor(ck["best_val_loss"]), "config": {"dataset": "tiny"}}
    torch.save(nano, path)
    capsys.readouterr()
    r = train.run({**c, "init_from": "resume", "max_iters": 6})
    assert [i for i, _ in r["losses"]] == [5, 6]
    assert "dropout is reseeded" in capsys.readouterr().out


def test_eval_only(tmp_path, corpus):
    r = train.run(tiny_config(tmp_path / "o", corpus, eval_only=True))
    assert len(r["evals"]) == 1 and r["losses"] == []


def test_bfloat16_autocast_on_cpu(tmp_path, corpus):
    r = train.run(tiny_config(tmp_path / "o", corpus, dtype="bfloat16", max_iters=3))
    assert all(math.isfinite(x) for _, x in r["losses"])


def test_cpu_runs_retain_freed_memory(tmp_path, corpus, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "retain_freed_memory", lambda: calls.append(1))
    train.run(tiny_config(tmp_path / "off", corpus, max_iters=1, retain_memory=False))
    assert calls == []
    train.run(tiny_config(tmp_path / "on", corpus, max_iters=1))
    assert calls == [1]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "foreign", "not_a_dict", "missing"])
def test_bad_checkpoint_is_a_clear_error(tmp_path, corpus, damage, capsys):
    c = tiny_config(tmp_path / "o", corpus, max_iters=5)
    ckpt = tmp_path / "o" / "ckpt.pt"
    if damage in ("truncated", "empty"):
        train.run(c)
        raw = ckpt.read_bytes()
        ckpt.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"")
    elif damage == "garbage":
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(os.urandom(1000))
    elif damage == "foreign":
        ckpt.parent.mkdir(parents=True)
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, ckpt)
    elif damage == "not_a_dict":
        ckpt.parent.mkdir(parents=True)
        torch.save(torch.zeros(3), ckpt)
    pattern = {"truncated": "truncated", "empty": "empty", "garbage": "truncated or not a PyTorch checkpoint",
               "foreign": "not a nanoGPT/nanofast checkpoint", "not_a_dict": "not a nanoGPT/nanofast checkpoint",
               "missing": "no checkpoint at"}[damage]
    with pytest.raises(CheckpointError, match=pattern):
        train.run({**c, "init_from": "resume"})
    capsys.readouterr()
    assert train.main(as_argv({**c, "init_from": "resume"})) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and pattern.split()[0] in err


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, corpus):
    c = tiny_config(tmp_path / "run", corpus, max_iters=100000, eval_interval=3, dropout=0.1,
                    lr_decay_iters=200000, always_save_checkpoint=False)
    env = dict(os.environ, PYTHONPATH=PYTHONPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "nanofast.train", *as_argv(c)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len([r for r in read_jsonl(metrics) if r["kind"] == "train"]) >= 5:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"no exit within 60 s of Ctrl-C:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "checkpoint saved" in out, (out, err)
    ck = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    k = ck["iter_num"]
    done = max(r["iter"] for r in read_jsonl(metrics) if r["kind"] == "train")
    assert k == done + 1 and ck["reason"] == "interrupt"  # the last finished iteration is in the checkpoint
    # the best-val checkpoint that ckpt.pt held is kept
    best = load_checkpoint(tmp_path / "run" / "ckpt_best.pt")
    assert best["reason"] == "eval" and best["iter_num"] % 3 == 0 and best["iter_num"] <= k
    assert best["best_val_loss"] == ck["best_val_loss"]
    # resume for 3 more iterations; compare with an uninterrupted run
    resumed = train.run({**c, "init_from": "resume", "max_iters": k + 2})
    full = train.run(tiny_config(tmp_path / "full", corpus, **{**{x: c[x] for x in
                                 ("eval_interval", "dropout", "lr_decay_iters", "always_save_checkpoint")},
                                 "max_iters": k + 2}))
    assert resumed["losses"] == [x for x in full["losses"] if x[0] >= k]


def test_peak_flops_probe_is_cached(tmp_path, monkeypatch):
    from nanofast import metrics
    monkeypatch.setenv("NANOFAST_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda d, t, budget_s=0.5: calls.append(1) or 1.5e11)
    assert metrics.peak_flops("cpu", torch.float32, verbose=False) == 1.5e11
    assert metrics.peak_flops("cpu", torch.float32, verbose=False) == 1.5e11
    assert len(calls) == 1
    data = json.loads((tmp_path / "cache" / "peak_flops.json").read_text())
    assert list(data.values()) == [1.5e11]
    monkeypatch.undo()
    assert metrics.measure_matmul_flops("cpu", torch.float32, budget_s=0.05) > 1e8  # the real probe runs


def test_peak_flops_cache_tells_processors_apart():
    from nanofast import metrics
    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n" \
           "stepping\t: 1\n\nprocessor\t: 1\nmodel\t\t: 99\n"
    zen5 = zen4.replace("cpu family\t: 25\nmodel\t\t: 17", "cpu family\t: 26\nmodel\t\t: 2")
    assert metrics.cpu_identity(zen4) == "AMD EPYC (AuthenticAMD 25 17 1)"  # the first processor's fields
    assert metrics.cpu_identity(zen5) != metrics.cpu_identity(zen4)
    assert metrics.cpu_identity("model name\t: Apple M2\n") == "Apple M2"
    graviton = "processor\t: 0\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\n" \
               "CPU part\t: 0xd40\nCPU revision\t: 1\n"
    assert metrics.cpu_identity(graviton) == "(0x41 8 0x1 0xd40 1)"
    assert metrics.cpu_identity(graviton.replace("0xd40", "0xd4f")) != metrics.cpu_identity(graviton)
    assert metrics.cpu_identity("") == ""


def test_peak_flops_refresh_replaces_the_cached_value(tmp_path, monkeypatch):
    from nanofast import metrics
    monkeypatch.setenv("NANOFAST_CACHE_DIR", str(tmp_path / "cache"))
    measured = iter([1e9, 4e11])
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda d, t, budget_s=0.5: next(measured))
    assert metrics.peak_flops("cpu", torch.float32, verbose=False) == 1e9
    assert metrics.peak_flops("cpu", torch.float32, verbose=False, refresh=True) == 4e11
    assert metrics.peak_flops("cpu", torch.float32, verbose=False) == 4e11  # from the cache now


def test_a_stale_peak_is_measured_again(tmp_path, corpus, monkeypatch, capsys):
    """A cached peak below what the run's steps reach (MFU above 100%) is measured again, once."""
    from nanofast import metrics
    monkeypatch.setenv("NANOFAST_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    key = metrics.peak_key("cpu", torch.float32)
    (tmp_path / "cache" / metrics.PEAK_CACHE_NAME).write_text(json.dumps({key: 1e3}))  # far too low
    probes = []
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda d, t, budget_s=0.5: probes.append(1) or 1e15)
    train.run(tiny_config(tmp_path / "out", corpus, peak_flops=0.0, max_iters=12, eval_interval=100))
    assert probes == [1]
    out = capsys.readouterr().out
    assert "measured again: 1,000,000.0 GFLOP/s" in out
    assert f"device: cpu ({torch.get_num_threads()} threads)" in out  # (a forked child shows 1)
    assert json.loads((tmp_path / "cache" / metrics.PEAK_CACHE_NAME).read_text())[key] == 1e15
    mfus = [r["mfu"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if r.get("mfu") is not None]
    assert mfus and all(0 < m < 1 for m in mfus)


def test_peak_flops_probe_leaves_torch_random_state_alone():
    """A run's dropout masks must not depend on whether the peak was cached or measured."""
    from nanofast import metrics
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    metrics.measure_matmul_flops("cpu", torch.float32, budget_s=0.01)
    assert torch.equal(torch.rand(4), expected)


# ----------------------------------------------------------------------------------------------
# nanofast-sample

def test_sample_cli(tmp_path, corpus, capsys):
    c = tiny_config(tmp_path / "o", corpus, max_iters=3)
    train.run(c)
    capsys.readouterr()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("QUEEN:\n", encoding="utf-8")
    argv = [f"--out_dir={tmp_path / 'o'}", f"--start=FILE:{prompt}", "--num_samples=2", "--max_new_tokens=10",
            "--temperature=0.5", "--top_k=5", "--seed=7", "--device=cpu", "--dtype=float32", "--kernels=torch"]
    assert sample_mod.main(argv) == 0
    out1 = capsys.readouterr().out
    assert out1.count("QUEEN:\n") == 2 and out1.count("---------------") == 2
    assert sample_mod.main(argv) == 0
    assert capsys.readouterr().out == out1  # seeded
    assert sample_mod.main(argv + ["--use_cache=False"]) == 0
    assert capsys.readouterr().out == out1  # the same tokens without the key/value cache
    assert sample_mod.main(argv + ["--dtype=bfloat16", "--kernels=nanofast"]) == 0  # bfloat16 weights
    out16 = capsys.readouterr().out
    assert out16.count("QUEEN:\n") == 2 and out16.count("---------------") == 2
    assert sample_mod.main([f"--out_dir={tmp_path / 'o'}", "--start=@@", "--device=cpu"]) == 2
    assert "vocabulary lacks" in capsys.readouterr().err
    assert sample_mod.main(["--out_dir=" + str(tmp_path / "none"), "--device=cpu"]) == 1
    assert sample_mod.main(["--nope=1"]) == 2
    bad_config = tmp_path / "hot.py"
    bad_config.write_text("temperature = float('inf')\n", encoding="utf-8")
    for bad in (["--temperature=-0.5"], [str(bad_config)]):
        assert sample_mod.main(bad + [a for a in argv if not a.startswith("--temperature")]) == 2
        assert "temperature must be a finite number >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_no_argument_run_finishes(tmp_path, monkeypatch):
    """`nanofast-train` with no arguments: the default config, end to end (about a minute here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOFAST_DATA_DIR", str(tmp_path / "data"))
    env = dict(os.environ, PYTHONPATH=PYTHONPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "nanofast.train"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    evals = [r for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < 2.6, evals
    assert time.time() - t0 < 600


SHARED_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TINY.is_file(), reason=f"tiny shakespeare not available locally ({SHARED_TINY})")
@pytest.mark.skipif(not _C.has_gemm_bf16(), reason="the recipe's figure is for CPUs with AVX512-BF16")
def test_cpu_recipe_reaches_val_1_70(tmp_path, monkeypatch):
    """The README's CPU recipe, as its command runs it: tiny shakespeare's val loss under 1.70 after its
    1600 steps (how long that takes is a benchmark figure, in the README, not asserted here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOFAST_DATA_DIR", str(tmp_path / "data"))
    env = dict(os.environ, PYTHONPATH=PYTHONPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "nanofast.train", "config/train_shakespeare_char_cpu.py",
                        f"--data_path={SHARED_TINY}"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    evals = [r for r in read_jsonl(tmp_path / "out-shakespeare-char-cpu" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["iter"] == 1600 and evals[-1]["val_loss"] < 1.70, evals


def test_console_scripts_point_at_main():
    from importlib import metadata
    try:
        eps = {e.name: e.value for e in metadata.entry_points(group="console_scripts") if e.name.startswith("nanofast-")}
    except Exception:
        eps = {}
    if not eps:
        pytest.skip("nanofast is not installed (no console scripts)")
    assert eps["nanofast-train"] == "nanofast.train:main" and eps["nanofast-sample"] == "nanofast.sample:main"
    assert callable(train.main) and callable(sample_mod.main)
