"""DDP through torchrun: two gloo processes match one process with doubled gradient accumulation."""
import os
import subprocess
import sys

import pytest
import torch

from nanofast import train
from nanofast.metrics import read_jsonl
from test_train import PYTHONPATH, as_argv, corpus, tiny_config  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def test_two_processes_match_one_with_doubled_accumulation(tmp_path, corpus):  # noqa: F811
    kw = dict(max_iters=6, eval_interval=3, eval_iters=2, gradient_accumulation_steps=2, dropout=0.0,
              backend="nccl")  # nccl is switched to gloo on the CPU
    one = train.run(tiny_config(tmp_path / "one", corpus, **kw))

    c2 = tiny_config(tmp_path / "two", corpus, **kw)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=PYTHONPATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "nanofast.train", *as_argv(c2)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert "DDP world size 2" in p.stdout

    recs = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    two_losses = [(r["iter"], r["loss"]) for r in recs if r["kind"] == "train"]
    two_evals = [(r["iter"], r["train_loss"], r["val_loss"]) for r in recs if r["kind"] == "eval"]
    assert [i for i, _ in two_losses] == [i for i, _ in one["losses"]] == list(range(7))
    for (i, a), (_, b) in zip(one["losses"], two_losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), i
    assert [e[0] for e in two_evals] == [e[0] for e in one["evals"]]
    for e1, e2 in zip(one["evals"], two_evals):
        assert e1[1:] == pytest.approx(e2[1:], rel=1e-4, abs=1e-5)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 7
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=1e-5, msg=k)
    # the checkpoint holds both ranks' random states
    assert len(b["rng_per_rank"]) == 2 and all(s is not None for s in b["rng_per_rank"])
    assert torch.equal(b["rng_per_rank"][0]["sampler"]["generator"], b["rng_per_rank"][1]["sampler"]["generator"])
