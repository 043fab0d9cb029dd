import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import nanofast
from tiny_gpt import TinyGPT


def _loss_and_grads(model, idx, targets):
    model.zero_grad()
    loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_patched_model_matches_unpatched():
    torch.manual_seed(0)
    ref = TinyGPT()
    model = copy.deepcopy(ref)
    params_before = {n: p for n, p in model.named_parameters()}
    nanofast.patch(model)
    assert sum(isinstance(m, nanofast.nn.LayerNorm) for m in model.modules()) == 5
    n_linear = sum(type(m) is torch.nn.Linear for m in ref.modules())
    assert n_linear > 0 and sum(type(m) is nanofast.nn.Linear for m in model.modules()) == n_linear
    assert {n: p for n, p in model.named_parameters()} == params_before  # same Parameter objects
    idx = torch.randint(0, 50, (3, 32))
    targets = torch.randint(0, 50, (3, 32))

    calls = []
    real = nanofast.ops.scaled_dot_product_attention
    nanofast.ops.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        loss, grads = _loss_and_grads(model, idx, targets)
    finally:
        nanofast.ops.scaled_dot_product_attention = real
    assert len(calls) == 2  # both blocks' attention ran on nanofast
    ref_loss, ref_grads = _loss_and_grads(ref, idx, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert F.scaled_dot_product_attention is nanofast.patch.__globals__["_torch_sdpa"]  # restored after forward


def test_unservable_calls_fall_back_with_one_warning(monkeypatch):
    """A learned additive mask (one that requires grad) is what nanofast's attention does not serve: it
    gives the mask no gradient. Such calls go to torch, with one warning that says why."""
    monkeypatch.setattr(nanofast.patch_attention, "_warned", set())

    class LearnedBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(5, 5))

        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, attn_mask=self.bias)

    m = nanofast.patch(LearnedBias())
    q = torch.randn(1, 2, 5, 4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out1 = m(q)
        out2 = m(q)
    msgs = [str(x.message) for x in w if "nanofast.patch" in str(x.message)]
    assert len(msgs) == 1 and "attn_mask requires grad" in msgs[0]
    torch.testing.assert_close(out1, F.scaled_dot_product_attention(q, q, q, attn_mask=m.bias))
    assert torch.equal(out1, out2)
    out1.sum().backward()
    assert m.bias.grad is not None  # torch's attention gave the mask its gradient


def test_masked_calls_are_served():
    class Masked(torch.nn.Module):
        def forward(self, q):
            mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    m = nanofast.patch(Masked())
    q = torch.randn(1, 2, 5, 4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="nanofast.patch")
        out = m(q)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=mask))


def test_patch_is_idempotent_and_selective():
    model = TinyGPT()
    nanofast.patch(model, attention=False)
    assert not isinstance(model.forward, type(nanofast.patch(TinyGPT()).forward))
    nanofast.patch(model)
    nanofast.patch(model)
    assert model.forward.forward.__self__ is model  # wrapped once, not twice
    untouched = nanofast.patch(TinyGPT(), layer_norm=False, linear=False)
    assert not any(isinstance(m, (nanofast.nn.LayerNorm, nanofast.nn.Linear)) for m in untouched.modules())
    assert any(type(m) is torch.nn.Linear for m in untouched.modules())


def test_patched_model_state_dict_and_pickle():
    ref = TinyGPT()
    model = nanofast.patch(copy.deepcopy(ref))
    assert list(model.state_dict()) == list(ref.state_dict())
    clone = pickle.loads(pickle.dumps(model))
    idx = torch.randint(0, 50, (2, 32))
    torch.testing.assert_close(clone(idx, idx), model(idx, idx))


def test_a_module_held_under_two_names_is_patched_once():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.proj = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)
            self.ln_again, self.proj_again = self.ln, self.proj  # one module, two names

        def forward(self, x):
            return self.proj_again(self.ln_again(self.proj(self.ln(x))))
    ref = Shared()
    model = nanofast.patch(copy.deepcopy(ref))
    # one replacement under both names (named_children would have yielded only the first)
    assert type(model.ln_again) is nanofast.nn.LayerNorm and model.ln_again is model.ln
    assert type(model.proj_again) is nanofast.nn.Linear and model.proj_again is model.proj
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), ref(x))
    nanofast.unpatch(model)
    assert type(model.ln) is torch.nn.LayerNorm and model.ln_again is model.ln and model.proj_again is model.proj


def test_forward_exception_restores_torch():
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    m = nanofast.patch(Boom())
    with pytest.raises(RuntimeError):
        m(torch.zeros(1))
    assert F.scaled_dot_product_attention is nanofast.patch.__globals__["_torch_sdpa"]


def test_patched_float16_model_runs_on_torchs_kernels():
    """float16 on the CPU is not a dtype nanofast's CPU kernels take: patched modules hand it to torch."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32)).half()
    model = nanofast.patch(copy.deepcopy(ref))
    assert isinstance(model[0], nanofast.nn.Linear) and isinstance(model[1], nanofast.nn.LayerNorm)
    x = torch.randn(4, 16).half()
    assert torch.equal(model(x), ref(x))


def test_other_threads_are_not_routed(monkeypatch):
    """While a patched model runs, a call of F.scaled_dot_product_attention from another thread (an
    unpatched model, say) still reaches torch's."""
    import threading

    calls = []
    real = nanofast.ops.scaled_dot_product_attention
    monkeypatch.setattr(nanofast.ops, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(threading.get_ident()) or real(*a, **k))
    q = torch.randn(1, 2, 5, 4)
    other = {}

    class Model(torch.nn.Module):
        def forward(self, q):
            t = threading.Thread(target=lambda: other.setdefault("out", F.scaled_dot_product_attention(q, q, q)))
            t.start()
            t.join()
            return F.scaled_dot_product_attention(q, q, q)

    out = nanofast.patch(Model())(q)
    assert calls == [threading.get_ident()]  # the patched model's own call only
    torch.testing.assert_close(other["out"], out, rtol=1e-5, atol=1e-6)
