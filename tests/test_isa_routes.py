"""Ops handed to torch on the instruction-set builds where torch's kernel is faster (ops/cpu.py's
TORCH_ON_ISA): they give torch's bits there, nanofast's with the routes off, and a training step stays
deterministic at any thread count."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from nanofast import _C, ops
from nanofast.model import GPT, GPTConfig
from nanofast.ops import cpu

ROUTED = [isa for isa in cpu.TORCH_ON_ISA if isa in _C.available_isas().split(",")]


@pytest.fixture(params=ROUTED)
def routed_isa(request, monkeypatch):
    monkeypatch.setattr(cpu, "ROUTES_ENABLED", True)
    _C.select_isa(request.param)
    yield request.param
    _C.select_isa("auto")


def _gelu_bits(x, dy):
    x = x.detach().requires_grad_()
    y = ops.gelu(x)
    y.backward(dy)
    return y.detach(), x.grad


def test_gelu_goes_to_torch(routed_isa, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(97, 130, generator=g), torch.randn(97, 130, generator=g)
    ours = _gelu_bits(x, dy)
    assert all(torch.equal(a, b) for a, b in zip(ours, (F.gelu(x), torch.ops.aten.gelu_backward(dy, x))))
    monkeypatch.setattr(cpu, "ROUTES_ENABLED", False)
    kernel = _gelu_bits(x, dy)
    assert not torch.equal(kernel[0], ours[0])  # nanofast's kernel rounds differently somewhere
    torch.testing.assert_close(kernel, ours)
    if ("gelu", torch.bfloat16) not in cpu.TORCH_ON_ISA[routed_isa]:  # nanofast's kernel in bfloat16
        x16, dy16 = x.bfloat16(), dy.bfloat16()
        kernel16 = _gelu_bits(x16, dy16)
        monkeypatch.setattr(cpu, "ROUTES_ENABLED", True)
        assert all(torch.equal(a, b) for a, b in zip(_gelu_bits(x16, dy16), kernel16))


@pytest.mark.parametrize("T", [1, 7, 65])
def test_attention_goes_to_torch_without_dropout(routed_isa, T, monkeypatch):
    if ("attention", torch.float32) not in cpu.TORCH_ON_ISA[routed_isa]:
        pytest.skip(f"{routed_isa} runs nanofast's attention")
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 24, generator=g) for _ in range(3))
    plain = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(plain, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0])
    # with dropout the masks are nanofast's: its kernel runs, whatever the build
    torch.manual_seed(1)
    dropped = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    monkeypatch.setattr(cpu, "ROUTES_ENABLED", False)
    torch.manual_seed(1)
    assert torch.equal(dropped, ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True))
    # the layout the kernel's (and the fake's) output has, which torch.compile's graphs assume
    assert plain.stride() == ops.scaled_dot_product_attention(q, k, v, is_causal=True).stride()


def _step_grads(threads):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65, dropout=0.0, bias=True))
    idx = torch.randint(65, (4, 33), generator=torch.Generator().manual_seed(1))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
    finally:
        torch.set_num_threads(saved)
    return [loss.detach()] + [p.grad for p in model.parameters()]


def test_training_step_is_deterministic_and_matches_the_kernels(routed_isa, monkeypatch):
    routed = _step_grads(2)
    assert all(torch.equal(a, b) for a, b in zip(routed, _step_grads(1)))
    monkeypatch.setattr(cpu, "ROUTES_ENABLED", False)
    kernels = _step_grads(2)
    for a, b in zip(routed, kernels):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_routes_can_be_turned_off():
    code = "import torch; from nanofast.ops import cpu; print(cpu.ROUTES_ENABLED, cpu.torch_runs('gelu', torch.float32))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"NANOFAST_ISA_ROUTES": "0", "NANOFAST_ISA": "generic", "PATH": ""}).stdout
    assert out.split() == ["False", "False"]


def test_a_forced_instruction_set_that_cannot_run_is_said(monkeypatch):
    # NANOFAST_ISA forces the kernels' instruction set; a misspelt name or one the CPU lacks falls back to
    # the best one, with a warning that names what runs
    monkeypatch.setenv("NANOFAST_ISA", "avx3")
    with pytest.warns(RuntimeWarning, match=rf"NANOFAST_ISA='avx3' is not .* the kernels run {_C.isa()}"):
        cpu._check_forced_isa()
    for honoured in (_C.isa(), "auto", ""):
        monkeypatch.setenv("NANOFAST_ISA", honoured)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cpu._check_forced_isa()
