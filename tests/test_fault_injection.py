"""Fault injection: what nanofast-train, nanofast-sample and nanofast-compare do when things go wrong.

A trainer killed while it saves, damaged and malicious checkpoints, malicious meta.pkl files, runs
that diverge, bad hyperparameters, unusable out_dirs, two trainers on one out_dir, resumes that
cannot be honoured, broken token files. Each case ends with a one-line error (or the right files
kept), never a traceback, never code run from a file.
"""
import os
import pickle
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nanofast import sample as sample_mod
from nanofast import train
from nanofast._io import atomic_write, load_plain_pickle
from nanofast.checkpoint import CheckpointError, load_checkpoint
from nanofast.configurator import ConfigError
from nanofast.data import DataError, read_meta
from nanofast.run_dir import RunDirLock
from test_train import PYTHONPATH, as_argv, corpus, tiny_config  # noqa: F401  (corpus is a fixture)


def small(out_dir, corpus, **kw):  # noqa: F811
    """A one-layer model: each run takes about a second."""
    return tiny_config(out_dir, corpus, **{**dict(n_layer=1, n_head=2, n_embd=16, block_size=16, max_iters=6,
                                                  eval_interval=3, eval_iters=1), **kw})


def one_line_error(capsys, pattern):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and pattern in err, err
    return err


class Payload:
    """A pickle that runs code when loaded: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ----------------------------------------------------------------------------------------------
# what a run keeps


def test_a_worse_resumed_run_keeps_the_best_checkpoint(tmp_path, corpus, capsys):  # noqa: F811
    """Issue 19, item 1: always_save_checkpoint=False, a resumed run whose val loss gets worse."""
    out = tmp_path / "o"
    c = small(out, corpus, max_iters=12, eval_interval=6, always_save_checkpoint=False, learning_rate=1e-2)
    train.run(c)
    best = load_checkpoint(out / "ckpt_best.pt")
    assert best["iter_num"] == 12 and load_checkpoint(out / "ckpt.pt")["iter_num"] == 12
    r = train.run({**c, "init_from": "resume", "learning_rate": 5.0, "decay_lr": False, "max_iters": 20,
                   "eval_interval": 4, "grad_clip": 0.0})
    assert all(v > best["best_val_loss"] for i, _, v in r["evals"] if i > 12), r["evals"]
    latest, kept = load_checkpoint(out / "ckpt.pt"), load_checkpoint(out / "ckpt_best.pt")
    assert latest["iter_num"] == 21 and latest["reason"] == "end"  # the latest state, to resume from
    assert kept["iter_num"] == 12 and torch.equal(kept["model"]["lm_head.weight"], best["model"]["lm_head.weight"])
    assert latest["best_val_loss"] == kept["best_val_loss"] == best["best_val_loss"] == r["best_val_loss"]
    # nanofast-sample samples the best by default, the latest on request
    assert sample_mod.checkpoint_path(str(out)) == str(out / "ckpt_best.pt")
    assert sample_mod.checkpoint_path(str(out), "latest") == str(out / "ckpt.pt")
    # a new run in the same out_dir does not keep the earlier run's best
    train.run({**c, "max_iters": 2, "eval_interval": 100})
    assert not (out / "ckpt_best.pt").exists()


def test_resuming_a_run_without_ckpt_best_keeps_its_best(tmp_path, corpus):  # noqa: F811
    """An out_dir of nanoGPT (or of nanofast before ckpt_best.pt): with always_save_checkpoint=False its
    ckpt.pt is the best state; a resumed run that replaces it keeps it as ckpt_best.pt first."""
    out = tmp_path / "o"
    c = small(out, corpus, max_iters=6, eval_interval=6, always_save_checkpoint=False, learning_rate=1e-2)
    train.run(c)
    (out / "ckpt_best.pt").unlink()
    best = (out / "ckpt.pt").read_bytes()
    train.run({**c, "init_from": "resume", "max_iters": 8, "eval_interval": 100})  # saves its end state
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 9
    assert (out / "ckpt_best.pt").read_bytes() == best


def test_best_val_loss_names_a_saved_state(tmp_path, corpus):  # noqa: F811
    """With always_save_checkpoint=True, best_val_loss is the lowest val loss, held by ckpt_best.pt."""
    out = tmp_path / "o"
    r = train.run(small(out, corpus, max_iters=9, eval_interval=3, learning_rate=3.0, decay_lr=False, grad_clip=0.0))
    vals = {i: v for i, _, v in r["evals"] if i > 0}
    kept = load_checkpoint(out / "ckpt_best.pt")
    assert kept["best_val_loss"] == min(vals.values()) == r["best_val_loss"]
    assert kept["iter_num"] == min(vals, key=vals.get)
    assert load_checkpoint(out / "ckpt.pt")["best_val_loss"] == kept["best_val_loss"]


# ----------------------------------------------------------------------------------------------
# runs that diverge, and the values that make them


def test_a_diverging_run_stops_and_keeps_the_finite_checkpoint(tmp_path, corpus, capsys):  # noqa: F811
    out = tmp_path / "o"
    c = small(out, corpus, max_iters=3)
    train.run(c)
    before = (out / "ckpt.pt").read_bytes()
    bad = {**c, "init_from": "resume", "learning_rate": 1e30, "decay_lr": False, "grad_clip": 0.0, "max_iters": 30}
    capsys.readouterr()
    assert train.main(as_argv(bad)) == 1
    one_line_error(capsys, "diverged")
    assert (out / "ckpt.pt").read_bytes() == before
    # logged only every 100 iterations: the weights are checked before the save at the end
    with pytest.raises(train.TrainingDiverged, match="weights are not finite"):
        train.run({**bad, "log_interval": 100, "eval_interval": 100})
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("arg, pattern", [
    ("--learning_rate=1e400", "learning_rate must be a finite number >= 0, got inf"),
    ("--learning_rate=-1", "learning_rate must be a finite number >= 0"),
    ("--beta1=1.5", "beta1 must be in [0, 1)"),
    ("--beta2=-0.1", "beta2 must be in [0, 1)"),
    ("--grad_clip=-1", "grad_clip must be a finite number >= 0"),
    ("--weight_decay=1e400", "weight_decay must be a finite number >= 0"),
    ("--warmup_iters=-5", "warmup_iters must be >= 0"),
    ("--init_from=gpt3", "init_from must be"),
])
def test_bad_hyperparameters_are_one_line_errors(arg, pattern, capsys):
    assert train.main([arg]) == 2
    one_line_error(capsys, pattern)


def test_a_nan_in_a_config_file_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "nan.py"
    cfg.write_text("learning_rate = float('nan')\n")
    assert train.main([str(cfg)]) == 2
    assert "learning_rate must be a finite number >= 0, got nan" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# damaged, foreign and malicious checkpoints


def test_a_checkpoint_with_flipped_bytes_is_refused(tmp_path, corpus, capsys):  # noqa: F811
    out = tmp_path / "o"
    c = small(out, corpus, max_iters=2)
    train.run(c)
    path = out / "ckpt.pt"
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:  # inside the largest tensor's bytes, which torch.load reads unchecked
        big = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    h = big.header_offset  # the local header: name and extra-field lengths at bytes 26 and 28
    start = h + 30 + int.from_bytes(raw[h + 26:h + 28], "little") + int.from_bytes(raw[h + 28:h + 30], "little")
    n = min(4096, big.file_size)
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)
    capsys.readouterr()
    assert train.main(as_argv({**c, "init_from": "resume"})) == 1
    one_line_error(capsys, f"checkpoint {path} is damaged")
    assert path.read_bytes() == bytes(raw)  # not overwritten
    assert sample_mod.main([f"--out_dir={out}", "--checkpoint=latest", "--device=cpu", "--num_samples=1"]) == 1
    one_line_error(capsys, "damaged")


def test_a_checkpoint_in_torchs_old_format_still_loads(tmp_path, corpus):  # noqa: F811
    """Files without zip checksums (torch's format before 1.6) load as before."""
    out = tmp_path / "o"
    c = small(out, corpus, max_iters=2)
    train.run(c)
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save(ck, out / "ckpt.pt", _use_new_zipfile_serialization=False)
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == ck["iter_num"]
    r = train.run({**c, "init_from": "resume", "max_iters": 4})
    assert [i for i, _ in r["losses"]] == [3, 4]


def test_a_malicious_checkpoint_is_refused_as_such(tmp_path, corpus, capsys):  # noqa: F811
    out = tmp_path / "o"
    out.mkdir()
    marker = tmp_path / "ran"
    torch.save({"model": {}, "model_args": {}, "x": Payload(marker)}, out / "ckpt.pt")
    c = small(out, corpus)
    assert train.main(as_argv({**c, "init_from": "resume"})) == 1
    err = one_line_error(capsys, "refused to load checkpoint")
    assert "could run code" in err and "weights_only=False" not in err and "truncated" not in err
    assert sample_mod.main([f"--out_dir={out}", "--device=cpu"]) == 1
    one_line_error(capsys, "refused to load checkpoint")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# meta.pkl: plain values only


def test_nanogpt_meta_pkl_loads_in_every_pickle_protocol(tmp_path):
    meta = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "stoi": {"a": 0, "b": 1, "c": 2}}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        p = tmp_path / f"meta{protocol}.pkl"
        p.write_bytes(pickle.dumps(meta, protocol=protocol))
        assert read_meta(p) == meta and load_plain_pickle(p) == meta


def test_a_malicious_meta_pkl_is_refused_by_train_and_sample(tmp_path, corpus, capsys):  # noqa: F811
    marker = tmp_path / "ran"
    # nanofast-train: a prepared dataset (nanoGPT's layout) whose meta.pkl carries a payload
    ds = tmp_path / "data" / "evil"
    ds.mkdir(parents=True)
    ids = np.arange(400, dtype=np.uint16) % 3
    (ds / "train.bin").write_bytes(ids.tobytes())
    (ds / "val.bin").write_bytes(ids.tobytes())
    (ds / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": Payload(marker)}))
    c = small(tmp_path / "o", corpus, dataset="evil", data_path="", data_dir=str(tmp_path / "data"))
    with pytest.raises(DataError, match="refused to load"):
        train.run(c)
    assert train.main(as_argv(c)) == 1
    one_line_error(capsys, "refused to load")
    # nanofast-sample: a nanoGPT checkpoint (no vocabulary of its own) whose dataset's meta.pkl is malicious
    out = tmp_path / "s"
    train.run(small(out, corpus, max_iters=2))
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck.pop("meta")
    ck["config"] = {"dataset": "evil"}
    torch.save(ck, out / "ckpt.pt")
    capsys.readouterr()
    assert sample_mod.main([f"--out_dir={out}", f"--data_dir={tmp_path / 'data'}", "--device=cpu",
                            "--num_samples=1", "--max_new_tokens=2"]) == 1
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# a trainer killed while it saves; two trainers on one out_dir; unusable out_dirs

KILL_IN_SECOND_SAVE = """
import os, signal, sys, torch
real_save, saves = torch.save, []
def save(obj, f, *a, **k):
    saves.append(1)
    if len(saves) == 2:  # the second checkpoint: half written, then kill -9
        f.write(b"PK" + b"x" * 4096)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = save
from nanofast.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_save_keeps_the_checkpoint_and_a_later_run_cleans_up(tmp_path, corpus):  # noqa: F811
    out = tmp_path / "o"
    c = small(out, corpus, max_iters=9, eval_interval=3)
    env = dict(os.environ, PYTHONPATH=PYTHONPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_SAVE, *as_argv(c)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    leaked = [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert leaked and all(f.startswith("ckpt.pt.") for f in leaked)
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 3  # the first save, whole
    (out / "loss.png.abc123.tmp").write_bytes(b"")  # as an earlier kill left it
    (out / "notes.tmp").write_text("mine")  # not a file of the run's: kept
    r = train.run({**c, "init_from": "resume"})
    assert r["iter_num"] == 10
    assert sorted(f for f in os.listdir(out) if f.endswith(".tmp")) == ["notes.tmp"]


def test_a_second_trainer_on_one_out_dir_is_refused(tmp_path, corpus, capsys):  # noqa: F811
    out = tmp_path / "o"
    out.mkdir()
    c = small(out, corpus, max_iters=1)
    holder = RunDirLock(str(out)).acquire()  # another trainer, holding the lock
    try:
        assert train.main(as_argv(c)) == 1
        one_line_error(capsys, f"in use by another training run (pid {os.getpid()})")
        assert not (out / "ckpt.pt").exists()
    finally:
        holder.release()
    # the lock file of a dead trainer (its pid, no lock held) is taken over
    (out / "train.lock").write_text("999999\n")
    train.run(c)
    assert (out / "train.lock").read_text().strip() == str(os.getpid())


def test_unusable_out_dirs_are_one_line_errors(tmp_path, corpus, capsys):  # noqa: F811
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(a_file, "is a file, not a folder"), (a_file / "sub", "cannot create out_dir")]
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        cases.append((ro, "not writable"))
    else:  # root writes anywhere the file system lets it: a read-only one
        cases.append((Path("/proc/nanofast-test-out"), "cannot create out_dir"))
    for out, pattern in cases:
        assert train.main(as_argv(small(out, corpus))) == 1, out
        one_line_error(capsys, pattern)


def test_files_follow_the_umask(tmp_path, corpus):  # noqa: F811
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", lambda f: f.write(b"x"))
        assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644
        train.run(small(tmp_path / "o", corpus, max_iters=3))
        for name in ("ckpt.pt", "ckpt_best.pt", "metrics.jsonl", "loss.png"):
            assert stat.S_IMODE(os.stat(tmp_path / "o" / name).st_mode) == 0o644, name
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------------------------
# resumes that cannot be honoured


def test_resume_refuses_another_shape_or_vocabulary(tmp_path, corpus, capsys):  # noqa: F811
    out = tmp_path / "o"
    c = small(out, corpus, max_iters=2)
    train.run(c)
    for change, pattern in [(dict(n_layer=3, n_embd=32), "asks for n_layer=3, n_embd=32"),
                            (dict(block_size=64), "asks for block_size=64")]:
        with pytest.raises(ConfigError, match=pattern):
            train.run({**c, **change, "init_from": "resume"})
        capsys.readouterr()
        assert train.main(as_argv({**c, **change, "init_from": "resume"})) == 2
        one_line_error(capsys, pattern)
    # a smaller block_size is honoured (the model is cropped)
    r = train.run({**c, "block_size": 8, "init_from": "resume", "max_iters": 3})
    assert [i for i, _ in r["losses"]] == [3]
    # another dataset: another vocabulary
    other = tmp_path / "other.txt"
    other.write_text("xyz " * 500 + "0123456789" * 50)
    with pytest.raises(ConfigError, match="vocabulary"):
        train.run({**c, "block_size": 8, "dataset": "other_vocab", "data_path": str(other), "init_from": "resume",
                   "max_iters": 4})


# ----------------------------------------------------------------------------------------------
# token files


def _prepared(tmp_path, train_bytes, vocab=3):
    ds = tmp_path / "data" / "bins"
    ds.mkdir(parents=True)
    (ds / "train.bin").write_bytes(train_bytes)
    (ds / "val.bin").write_bytes((np.arange(400) % vocab).astype(np.uint16).tobytes())
    (ds / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab, "itos": {i: chr(97 + i) for i in range(vocab)}}))
    return dict(dataset="bins", data_path="", data_dir=str(tmp_path / "data"))


@pytest.mark.parametrize("case, pattern", [("odd", "an odd number"), ("ids", "holds token id 7")])
def test_broken_token_files_are_one_line_errors(tmp_path, corpus, case, pattern, capsys):  # noqa: F811
    ids = (np.arange(400) % 3).astype(np.uint16)
    if case == "ids":
        ids[123] = 7
    raw = ids.tobytes() + (b"\0" if case == "odd" else b"")
    c = small(tmp_path / "o", corpus, **_prepared(tmp_path, raw))
    assert train.main(as_argv(c)) == 1
    one_line_error(capsys, pattern)


def test_gpt2_without_transformers_or_network_is_a_one_line_error(tmp_path, capsys):
    code = train.main(["--init_from=gpt2", f"--out_dir={tmp_path / 'o'}", "--device=cpu", "--compile=False",
                       "--max_iters=0", f"--data_dir={tmp_path / 'data'}"])
    if code == 0:
        pytest.skip("GPT-2's weights are available here")
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err and "gpt2" in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------
# nanofast-compare


def test_compare_refuses_a_target_against_itself(capsys):
    from nanofast import compare
    assert compare.main(["cpu", "cpu", "--iters=2"]) == 2
    err = capsys.readouterr().err
    assert "nothing to compare" in err and "because of the nothing" not in err
