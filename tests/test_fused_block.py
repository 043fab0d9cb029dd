"""nanofast/fused_block.py: a transformer block as one hand-written autograd node.

The hand-written backward must give what autograd gives for the per-op block: the same kernels run in
the same order on the same data, so the loss and every gradient are compared bit for bit. float64
gradcheck checks the backward on its own, and the fall-backs (hooks, replaced modules, torch's kernels)
are checked to really run the per-op block.
"""
import contextlib

import pytest
import torch
from torch import nn

from nanofast import fused_block
from nanofast.model import GPT, Block, GPTConfig
from nanofast.ops import cpu


def _model(n_embd=48, n_head=4, n_layer=2, block_size=32, dropout=0.0, bias=False, kernels="nanofast",
           dtype=torch.float32):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=65,
                    dropout=dropout, bias=bias, kernels=kernels)
    return GPT(cfg).to(dtype)


def _autocast(dtype):
    if dtype == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss_and_grads(model, X, Y, fused, amp_dtype, seed=5):
    model.use_fused_blocks(fused)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    with _autocast(amp_dtype):
        _, loss = model(X, Y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _node_names(t):
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [f for f, _ in node.next_functions]
    return names


def _batch(T, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(65, (B, T), generator=g), torch.randint(65, (B, T), generator=g)


@pytest.mark.parametrize("amp_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("gemm", [False, True], ids=["size-rule", "gemm-always"])
def test_same_loss_and_gradients_as_the_per_op_block(monkeypatch, amp_dtype, bias, dropout, gemm):
    """gemm-always: nanofast's GEMMs (float32, or bfloat16 under autocast) take every product, however
    small, where the CPU has them; else these sizes are torch's."""
    if gemm:
        monkeypatch.setattr(cpu, "GEMM_MIN_MACS", 0)
        monkeypatch.setattr(cpu, "GEMM_MIN_ROWS", 1)
    model = _model(bias=bias, dropout=dropout)
    X, Y = _batch(32)
    loss_f, grads_f = _loss_and_grads(model, X, Y, True, amp_dtype)
    loss_p, grads_p = _loss_and_grads(model, X, Y, False, amp_dtype)
    assert torch.equal(loss_f, loss_p), (loss_f.item(), loss_p.item())
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == len(list(model.parameters()))
    for name in grads_p:
        assert torch.equal(grads_f[name], grads_p[name]), \
            f"{name}: max diff {(grads_f[name] - grads_p[name]).abs().max().item():.3g}"


@pytest.mark.parametrize("amp_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_gelu_derivative_recomputed_above_the_size_limit(monkeypatch, amp_dtype):
    """Above _KEEP_GELU_GRAD_MAX the block keeps GELU's input, not its derivative: the same bits too."""
    monkeypatch.setattr(fused_block, "_KEEP_GELU_GRAD_MAX", 0)
    model = _model(dropout=0.1)
    X, Y = _batch(32)
    loss_f, grads_f = _loss_and_grads(model, X, Y, True, amp_dtype)
    loss_p, grads_p = _loss_and_grads(model, X, Y, False, amp_dtype)
    assert torch.equal(loss_f, loss_p)
    for name in grads_p:
        assert torch.equal(grads_f[name], grads_p[name]), name


@pytest.mark.parametrize("amp_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_evaluation_without_autograd_gives_the_training_forwards_bits(monkeypatch, amp_dtype):
    """With grad mode off (estimate_loss, sampling) the block runs without an autograd node and computes
    GELU without its derivative, as it does where no gradient is wanted: the logits and loss keep their
    bits."""
    monkeypatch.setattr(cpu, "ROUTES_ENABLED", False)  # nanofast's GELU on every build
    model = _model(dropout=0.0)
    X, Y = _batch(32)
    computed = []
    real = cpu.gelu_forward
    monkeypatch.setattr(cpu, "gelu_forward", lambda *a, **k: computed.append(1) or real(*a, **k))
    with _autocast(amp_dtype):
        loss, logits = model(X, Y)[1], model(X)[0]
        assert computed == []  # (the training forward keeps GELU's derivative)
        with torch.no_grad():
            loss_eval, logits_eval = model(X, Y)[1], model(X)[0]
    assert len(computed) == 2 * model.config.n_layer and loss_eval.grad_fn is None
    assert torch.equal(logits_eval, logits.detach()) and torch.equal(loss_eval, loss.detach())
    model.requires_grad_(False)  # grad mode on, but no gradient wanted: no backward either
    with _autocast(amp_dtype):
        assert torch.equal(model(X)[0], logits.detach())
    assert len(computed) == 3 * model.config.n_layer


@pytest.mark.parametrize("T", [1, 7, 63, 65])
@pytest.mark.parametrize("n_embd,n_head", [(48, 4), (60, 4), (45, 3)], ids=["hs12", "hs15", "hs15-3heads"])
def test_odd_shapes(T, n_embd, n_head):
    model = _model(n_embd=n_embd, n_head=n_head, block_size=65)
    X, Y = _batch(T)
    loss_f, grads_f = _loss_and_grads(model, X, Y, True, torch.float32)
    loss_p, grads_p = _loss_and_grads(model, X, Y, False, torch.float32)
    assert torch.equal(loss_f, loss_p)
    for name in grads_p:
        assert torch.equal(grads_f[name], grads_p[name]), name


def test_the_block_is_one_autograd_node():
    model = _model()
    X, Y = _batch(16)
    _, loss = model(X, Y)
    names = _node_names(loss)
    assert "_BlockBackward" in names
    assert not names & {"_EagerAttentionBackward", "_EagerGeluBackward", "SplitBackward0"}
    model.use_fused_blocks(False)
    _, loss = model(X, Y)
    names = _node_names(loss)
    assert "_BlockBackward" not in names and "_EagerAttentionBackward" in names


def test_float64_gradcheck():
    """The backward against finite differences, every input and parameter, bias and a pending update."""
    torch.manual_seed(0)
    block = _model(n_embd=12, n_head=2, n_layer=1, bias=True, dtype=torch.float64).transformer.h[0]
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    pending = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in
              (block.get_parameter(n) for n in Block.FUSED_PARAMETERS)]

    def f(x, pending, *params):
        return fused_block._Block.apply(x, pending, 2, 0.0, torch.float64, *params)

    assert torch.autograd.gradcheck(f, (x, pending, *params), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda x, *p: f(x, None, *p), (x, *params), eps=1e-6, atol=1e-7)


def test_frozen_parameters_get_no_gradient():
    model = _model(bias=True)
    for block in model.transformer.h:
        block.ln_1.weight.requires_grad_(False)
        block.mlp.c_fc.bias.requires_grad_(False)
    X, Y = _batch(16)
    _, grads_f = _loss_and_grads(model, X, Y, True, torch.float32)
    _, grads_p = _loss_and_grads(model, X, Y, False, torch.float32)
    assert grads_f.keys() == grads_p.keys()
    assert not any(n.endswith("ln_1.weight") or n.endswith("c_fc.bias") for n in grads_f)
    for name in grads_p:
        assert torch.equal(grads_f[name], grads_p[name]), name


def test_deterministic():
    model = _model(dropout=0.1)
    X, Y = _batch(32)
    a = _loss_and_grads(model, X, Y, True, torch.bfloat16)
    b = _loss_and_grads(model, X, Y, True, torch.bfloat16)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][n], b[1][n]) for n in a[1])


def test_a_hook_sends_the_block_through_its_modules():
    model = _model()
    X, Y = _batch(16)
    calls = []
    handle = model.transformer.h[1].mlp.c_fc.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    _, loss = model(X, Y)
    assert calls == [torch.Size([3, 16, 4 * 48])]
    handle.remove()
    calls.clear()
    model(X, Y)
    assert calls == []


def test_a_replaced_module_sends_the_block_through_its_modules():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = _model()
    block = model.transformer.h[0]
    old = block.mlp.c_proj
    block.mlp.c_proj = Scaled(old.in_features, old.out_features, bias=False)
    block.mlp.c_proj.weight = old.weight
    x = torch.randn(2, 8, 48)
    assert not block.can_run_fused(x, None)
    expected = 2 * old(block.mlp.gelu(block.mlp.c_fc(model.transformer.h[0].ln_2(
        x + block.attn(block.ln_1(x))))))
    torch.testing.assert_close(block(x)[1], expected)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_block_hands_over_its_parameters_in_order(bias):
    """Block._fused_parameters reads nn.Module's dictionaries: the FUSED_PARAMETERS themselves, None
    for a bias that is off, and a plain tensor put in a parameter's place."""
    block = _model(bias=bias).transformer.h[0]
    want = [getattr(block.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in Block.FUSED_PARAMETERS]
    got = block._fused_parameters()
    assert len(got) == len(want) == 12 and all(g is w for g, w in zip(got, want))
    assert (got[1] is None) == (not bias) and (got[11] is None) == (not bias)
    fc = block.mlp.c_fc
    plain = fc.weight.detach().clone()
    del fc.weight
    fc.weight = plain  # no longer a registered parameter
    assert block._fused_parameters()[8] is plain


def test_falls_back_where_it_does_not_apply():
    x = torch.randn(2, 8, 48)
    block = _model(kernels="torch").transformer.h[0]
    assert not block.can_run_fused(x, None)  # torch's kernels
    block = _model().transformer.h[0]
    assert block.can_run_fused(x, None)
    assert not block.can_run_fused(x.double(), None)  # the stream's dtype is not the weights'
    assert not block.can_run_fused(x, torch.randn(2, 7, 48))  # a pending update of another shape
    with torch.autocast("cpu", dtype=torch.float16):
        assert not block.can_run_fused(x, None)  # float16: not a CPU kernel dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block.can_run_fused(x, None)
