"""A process that forks or runs threads keeps working: a child forked after OpenMP's threads started
trains, on one thread (GNU OpenMP's threads do not survive fork: ops/cpu.py, "threads"), and Python
threads run the kernels at once."""
import os
import sys
import threading
import time
import traceback

import pytest
import torch

from nanofast.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP and fork: Linux")

CHILD_SECONDS = 60  # a healthy child takes about a second; a deadlocked one never ends


def _model():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65, bias=False, dropout=0.0)
    return GPT(cfg)


def _step(model, seed, dtype):
    """The loss and every gradient of one forward + backward, as one flat float64 tensor."""
    g = torch.Generator().manual_seed(seed)
    X, Y = (torch.randint(65, (4, 32), generator=g) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        _, loss = model(X, Y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([loss.detach().double().reshape(1)] + [t.double().flatten() for t in grads])


def _in_child(work, path):
    """Runs work() in a forked child and returns (its result as bytes, the child's thread count), or
    fails if the child does not finish. The child touches only what work() does and writes to path."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            payload = f"{torch.get_num_threads()}\n".encode() + work()
            code = 0
        except BaseException:
            payload = traceback.format_exc().encode()  # for the parent's message
        finally:
            with open(path, "wb") as f:
                f.write(payload)
            os._exit(code)
    deadline = time.monotonic() + CHILD_SECONDS
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child did not finish in {CHILD_SECONDS} s (an OpenMP deadlock)")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child failed:\n" + path.read_text(errors="replace")
    threads, _, result = path.read_bytes().partition(b"\n")
    return result, int(threads)


@pytest.fixture
def two_threads():
    """At least two threads (so that the parent starts OpenMP's workers), restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(max(saved, 2))
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_forked_child_trains_after_the_parent_ran_threads(two_threads, dtype, tmp_path):
    model = _model()
    expected = _step(model, 1, dtype)  # the parent's kernels ran on two threads: the pool exists
    result, child_threads = _in_child(lambda: _step(model, 1, dtype).numpy().tobytes(), tmp_path / "child")
    assert child_threads == 1
    # one thread in the child, two in the parent: the same bits
    assert torch.equal(torch.frombuffer(bytearray(result), dtype=torch.float64), expected)
    assert torch.get_num_threads() >= 2  # the parent's setting is its own


def test_forked_child_optimizer_step(two_threads, tmp_path):
    from nanofast.optim import AdamW
    params = [torch.nn.Parameter(torch.randn(300, 257)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    AdamW([p.detach().clone().requires_grad_() for p in params]).step()  # threads started in the parent
    opt = AdamW(params, lr=1e-2)

    def work():
        opt.step(max_grad_norm=1.0)
        return torch.cat([p.detach().flatten() for p in params]).numpy().tobytes()
    result, _ = _in_child(work, tmp_path / "child")
    opt.step(max_grad_norm=1.0)
    assert torch.equal(torch.frombuffer(bytearray(result), dtype=torch.float32),
                       torch.cat([p.detach().flatten() for p in params]))


def test_forked_child_runs_torch_ops_after_torch_threads(two_threads, tmp_path):
    # OpenMP's workers started by torch's own ops (a reduction over 2^24 elements) are as fatal to a child
    x = torch.randn(1 << 24)
    expected = (x * 2).sum()
    result, child_threads = _in_child(lambda: (x * 2).sum().reshape(1).numpy().tobytes(), tmp_path / "child")
    assert child_threads == 1
    assert torch.frombuffer(bytearray(result), dtype=torch.float32)[0] == pytest.approx(float(expected), rel=1e-5)


def test_threads_run_the_kernels_at_once():
    # Python threads each training the same model on their own batches, at the same time, give what
    # each gives alone (no shared buffers in the kernels, autocast per thread; no dropout, whose seeds
    # come from torch's one generator in whatever order the threads draw them)
    model = _model()
    jobs = [(seed, dtype) for seed in range(3) for dtype in (torch.float32, torch.bfloat16)]
    expected = {job: _step(model, *job) for job in jobs}
    results, errors = {}, []

    def worker(job):
        try:
            for _ in range(3):
                results.setdefault(job, []).append(_step(model, *job))
        except Exception as e:  # reported below: an exception in a thread would not fail the test
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=CHILD_SECONDS)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    for job in jobs:
        assert len(results[job]) == 3
        for r in results[job]:
            assert torch.equal(r, expected[job]), job
