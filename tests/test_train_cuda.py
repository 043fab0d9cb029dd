"""Training steps on CUDA in each mode nanofast-train offers: eager, compiled (the Triton kernels as
triton_ops) and compiled into CUDA graphs (compile_mode='reduce-overhead'). Needs a GPU (run by
bench/gpu_check.sh); skipped elsewhere."""
import pytest
import torch

from nanofast.model import GPT, GPTConfig
from nanofast.training import precision, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CFG = dict(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False)


def _run(compile_mode, dropout, steps=3, lr=1e-3, dtype="bfloat16"):
    """(losses, gradients before each update) of `steps` steps on fixed batches from fixed weights."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG, dropout=dropout, kernels="nanofast")).cuda()
    optimizer = model.configure_optimizers(0.1, lr, (0.9, 0.95), "cuda")
    run = model if compile_mode is None else torch.compile(
        model, mode=None if compile_mode == "default" else compile_mode, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(65, (8, 65), generator=g).cuda() for _ in range(steps)]
    prec = precision(dtype, "cuda")
    losses, grads = [], []
    torch.manual_seed(123)
    for b in batches:
        before = lambda: grads.append([p.grad.float().clone() for p in model.parameters()])  # noqa: E731
        loss, _ = train_step(run, optimizer, prec, lambda i, b=b: (b[:, :-1].contiguous(), b[:, 1:].contiguous()), 1, 1.0, lr,
                             before_update=before)
        losses.append(float(loss))
    return losses, grads


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_steps_match_eager(mode):
    """The same losses and gradients as eager mode over 3 steps, within bfloat16 rounding (the
    compiled graph fuses torch's ops differently, so not bit for bit)."""
    eager_losses, eager_grads = _run(None, 0.0)
    losses, grads = _run(mode, 0.0)
    for a, b in zip(losses, eager_losses):
        assert abs(a - b) <= 2e-2 * abs(b), (losses, eager_losses)
    for step_a, step_b in zip(grads, eager_grads):
        for a, b in zip(step_a, step_b):
            assert (a - b).norm() <= 5e-2 * b.norm() + 1e-6


@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead"])
def test_dropout_masks_change_every_step(mode):
    """With the learning rate at zero the weights stay put, so three steps on one batch differ only by
    their dropout masks: a seed baked into a graph would give three equal losses."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG, dropout=0.3, kernels="nanofast")).cuda()
    optimizer = model.configure_optimizers(0.0, 0.0, (0.9, 0.95), "cuda")
    run = model if mode is None else torch.compile(model, mode=None if mode == "default" else mode)
    b = torch.randint(65, (8, 65), generator=torch.Generator().manual_seed(2)).cuda()
    X, Y = b[:, :-1].contiguous(), b[:, 1:].contiguous()
    prec = precision("bfloat16", "cuda")
    losses = [float(train_step(run, optimizer, prec, lambda i: (X, Y), 1, 0.0, 0.0)[0])
              for _ in range(4)]
    assert len(set(losses[1:])) == 3, losses


def test_eager_dropout_reproduces_under_manual_seed():
    assert _run(None, 0.2, steps=2)[0] == _run(None, 0.2, steps=2)[0]


def test_cpu_optimizer_state_resumes_on_a_fused_cuda_adamw():
    """A checkpoint written on the CPU resumed by CUDA's fused AdamW: the loaded 'step' counters go to
    the device as the fused kernel needs (torch places them by the saved groups' flags otherwise)."""
    from types import SimpleNamespace

    from nanofast.train import resume_states

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG, dropout=0.0, kernels="nanofast"))
    cpu_opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(65, (2, 17))
    model(x[:, :-1], x[:, 1:])[1].backward()
    cpu_opt.step()
    checkpoint = dict(optimizer=cpu_opt.state_dict(), rng={"sampler": None}, iter_num=1)
    model.cuda()
    cuda_opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
    assert cuda_opt.param_groups[0].get("fused")
    resume_states(checkpoint, cuda_opt, torch.amp.GradScaler("cuda", enabled=False), None, {}, SimpleNamespace(rank=0),
                  print)
    assert all(s["step"].device.type == "cuda" and float(s["step"]) == 1.0 for s in cuda_opt.state.values())
    model.zero_grad()
    model(x[:, :-1].cuda(), x[:, 1:].cuda())[1].backward()
    cuda_opt.step()  # raised "state_steps is on cpu" before
    assert all(float(s["step"]) == 2.0 for s in cuda_opt.state.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampling_with_the_cache_draws_the_same_tokens_on_cuda(dtype):
    """GPT.generate on CUDA (the Triton attention reading one query row against the cache's buffers)
    draws the tokens it draws without the cache, from the same seed, at batch 3; and it starts and
    stays on the model's device."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CFG, "block_size": 32}, dropout=0.0, kernels="nanofast")).cuda().eval()
    idx = torch.randint(65, (3, 5), generator=torch.Generator().manual_seed(3)).cuda()
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            runs.append(model.generate(idx, 20, temperature=0.9, top_k=20, use_cache=use_cache))
    assert runs[0].device.type == "cuda" and runs[0].shape == (3, 25)
    assert torch.equal(runs[0][:, :5], idx)
    assert torch.equal(runs[0], runs[1])
