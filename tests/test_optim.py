"""nanofast.optim.AdamW against torch.optim.AdamW (+ clip_grad_norm_): parity with a float64 run,
the norm it returns, state_dicts both ways, determinism across thread counts, bad input."""
import copy

import pytest
import torch

from nanofast.optim import AdamW
from nanofast.testing import assert_parity

# sizes that are not multiples of a vector or of the kernel's 8192-element chunks
SHAPES = [(300, 70), (8193,), (129,), (7,), (1,)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _groups(params, weight_decay=0.1):
    return [{"params": params[:3], "weight_decay": weight_decay}, {"params": params[3:], "weight_decay": 0.0}]


def _grads(params, step, scale=3.0):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


def _run_torch(dtype, steps, clip, **kw):
    params = _params(dtype)
    opt = torch.optim.AdamW(_groups(params), **HYPER, **kw)
    norms = []
    for s in range(steps):
        _grads(params, s)
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(params, clip))
        opt.step()
    return params, norms


def _run_ours(steps, clip, opt=None, params=None, start=0):
    params = _params(torch.float32) if params is None else params
    opt = AdamW(_groups(params), **HYPER) if opt is None else opt
    norms = []
    for s in range(start, steps):
        _grads(params, s)
        norms.append(opt.step(max_grad_norm=clip) if clip else opt.step())
    return params, norms, opt


@pytest.mark.parametrize("clip", [None, 1.0, 1e9], ids=["no-clip", "clip", "clip-inactive"])
def test_parity_with_torch_adamw(isa, clip):
    ref, ref_norms = _run_torch(torch.float64, 12, clip)
    theirs, their_norms = _run_torch(torch.float32, 12, clip, fused=True)
    ours, our_norms, _ = _run_ours(12, clip)
    for i, (o, t, r) in enumerate(zip(ours, theirs, ref)):
        assert_parity(f"param {i} {tuple(o.shape)}", o.detach(), t.detach(), r.detach())
    if clip:
        for o, t, r in zip(our_norms, their_norms, ref_norms):
            assert o.dtype == torch.float32 and o.dim() == 0
            assert_parity("norm", o, t, r)


def test_the_clip_scales_the_update_not_the_gradients():
    params = _params(torch.float32)
    opt = AdamW(_groups(params), **HYPER)
    _grads(params, 0)
    before = [p.grad.clone() for p in params]
    norm = opt.step(max_grad_norm=1.0)
    assert float(norm) > 1.0  # the clip was active
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_parameters_without_gradients_are_left_alone():
    params = _params(torch.float32)
    opt = AdamW(_groups(params), **HYPER)
    _grads(params, 0)
    params[1].grad = None
    frozen = params[1].detach().clone()
    opt.step(max_grad_norm=1.0)
    assert torch.equal(params[1].detach(), frozen) and params[1] not in opt.state
    assert float(opt.state[params[0]]["step"]) == 1.0


def test_state_dict_moves_between_torch_and_nanofast():
    full, _, _ = _run_ours(10, 1.0)
    # 5 steps with ours, resume in torch's AdamW for 1, back to ours for the rest
    params, _, ours = _run_ours(5, 1.0)
    theirs = torch.optim.AdamW(_groups(params), **HYPER)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    _grads(params, 5)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    theirs.step()
    ours = AdamW(_groups(params), **HYPER)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert all(float(s["step"]) == 6.0 for s in ours.state.values())
    _run_ours(10, 1.0, opt=ours, params=params, start=6)
    for p, f in zip(params, full):
        torch.testing.assert_close(p, f, rtol=1e-5, atol=1e-6)


def test_learning_rate_and_weight_decay_follow_the_param_groups():
    params = _params(torch.float32)
    opt = AdamW(_groups(params, weight_decay=0.5), **HYPER)
    _grads(params, 0)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))  # lr 0: no update, no decay
    opt.param_groups[0]["lr"] = 1e-3
    _grads(params, 1)
    torch.zero_(params[0].grad)
    opt.step()
    # a zero gradient leaves only the decay: p * (1 - lr * wd), plus the old moments' tiny step
    torch.testing.assert_close(params[0].detach(), before[0] * (1 - 1e-3 * 0.5), rtol=0, atol=2e-3)


def test_deterministic_and_independent_of_the_thread_count():
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            params, norms, _ = _run_ours(4, 1.0)
            results.append([p.detach().clone() for p in params] + norms)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_non_finite_gradients_propagate_as_in_torch():
    params = _params(torch.float32)
    opt = AdamW(_groups(params), **HYPER)
    _grads(params, 0)
    params[2].grad[3] = float("nan")
    norm = opt.step(max_grad_norm=1.0)
    assert torch.isnan(norm) and all(torch.isnan(p).all() for p in params)


def test_a_training_loop_uses_it_on_the_cpu():
    from nanofast.model import GPT, GPTConfig

    cfg = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, bias=False)
    ours = GPT(GPTConfig(**cfg, kernels="nanofast")).configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    theirs = GPT(GPTConfig(**cfg, kernels="torch")).configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(ours, AdamW) and type(theirs) is torch.optim.AdamW


@pytest.mark.parametrize("make, pattern", [
    (lambda: AdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)]), "CPU float32 parameters.*float64"),
    (lambda: AdamW([torch.zeros(3, requires_grad=True)], lr=-1.0), "invalid lr"),
    (lambda: AdamW([torch.zeros(3, requires_grad=True)], betas=(1.0, 0.9)), r"invalid betas\[0\]"),
    (lambda: AdamW([torch.zeros(3, requires_grad=True)], weight_decay=-0.1), "invalid weight_decay"),
    (lambda: AdamW([torch.zeros(3, requires_grad=True)]).add_param_group({"params": [torch.zeros(2, dtype=torch.bfloat16)]}),
     "bfloat16"),
])
def test_bad_construction_is_a_clear_error(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def _stepped(setup, **step_kw):
    p = torch.zeros(4, 3, requires_grad=True)
    p.grad = torch.ones(4, 3)
    opt = AdamW([p])
    setup(p, opt)
    opt.step(**step_kw)


@pytest.mark.parametrize("setup, step_kw, pattern", [
    (lambda p, o: setattr(p, "grad", torch.ones(4, 3).to_sparse()), {}, r"dense float32 tensor.*\(sparse\)"),
    (lambda p, o: o.param_groups[0].update(amsgrad=True), {}, "amsgrad"),
    (lambda p, o: None, dict(max_grad_norm=0.0), "max_grad_norm must be positive"),
    (lambda p, o: None, dict(max_grad_norm=-1.0), "max_grad_norm must be positive"),
])
def test_bad_step_is_a_clear_error(setup, step_kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        _stepped(setup, **step_kw)


def test_non_contiguous_parameters_are_refused():
    base = torch.zeros(3, 4)
    p = torch.nn.Parameter(base.t())  # a transposed view: strides (1, 4)
    p.grad = torch.ones(4, 3)
    with pytest.raises(ValueError, match="contiguous"):
        AdamW([p]).step()
