"""Double backward (create_graph=True): every op's gradients are themselves differentiable, as torch's
are, so gradient penalties and Hessian-vector products come out right instead of silently detached."""
import pytest
import torch
import torch.nn.functional as F

from nanofast import ops
from nanofast.testing import assert_parity, attention_reference


def _leaves(*shapes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _seeded(fn):
    """fn with torch's generator reset first, so that dropout draws the same seed on every call."""
    def call(*args):
        torch.manual_seed(0)
        return fn(*args)
    return call


def _rotary(q, k, interleaved=False):
    angles = torch.arange(8, dtype=q.dtype).view(2, 4, 1) * 0.3 + torch.arange(4) * 0.1  # (batch, seq, 4 of 6)
    return ops.apply_rotary_pos_emb(q, k, angles.cos(), angles.sin(), interleaved=interleaved)


CASES = {
    "layer_norm": (lambda x, w, b: ops.layer_norm(x, (6,), w, b), [(4, 6), (6,), (6,)]),
    "layer_norm_2d_shape": (lambda x, w, b: ops.layer_norm(x, (2, 3), w.view(2, 3), b.view(2, 3)),
                            [(4, 2, 3), (6,), (6,)]),
    "layer_norm_no_affine": (lambda x: ops.layer_norm(x, (5,)), [(3, 5)]),
    "add_layer_norm": (lambda x, r, w, b: ops.add_layer_norm(x, r, (6,), w, b), [(2, 3, 6), (2, 3, 6), (6,), (6,)]),
    "add_layer_norm_normed_only": (lambda x, r, w, b: ops.add_layer_norm(x, r, (6,), w, b)[1],
                                   [(2, 3, 6), (2, 3, 6), (6,), (6,)]),
    "add_layer_norm_sum_only": (lambda x, r, w, b: ops.add_layer_norm(x, r, (6,), w, b)[0].sin(),
                                [(2, 3, 6), (2, 3, 6), (6,), (6,)]),
    # a normalized shape of two dimensions takes the custom op (the path torch.compile records)
    "add_layer_norm_custom_op": (lambda x, r, w, b: ops.add_layer_norm(x, r, (3, 6), w.expand(3, 6), b.expand(3, 6)),
                                 [(2, 3, 6), (2, 3, 6), (6,), (6,)]),
    "rms_norm": (lambda x, w: ops.rms_norm(x, (6,), w, 1e-6), [(4, 6), (6,)]),
    "rms_norm_llama_gemma": (lambda x, w: ops.rms_norm(x, (6,), w, 1e-6, weight_offset=1.0, cast_before_weight=True),
                             [(4, 6), (6,)]),
    "rms_norm_2d_shape": (lambda x, w: ops.rms_norm(x, (2, 3), w.view(2, 3)), [(4, 2, 3), (6,)]),
    "add_rms_norm": (lambda x, r, w: ops.add_rms_norm(x, r, (6,), w, 1e-6), [(2, 3, 6), (2, 3, 6), (6,)]),
    "add_rms_norm_normed_only": (lambda x, r, w: ops.add_rms_norm(x, r, (6,), w)[1], [(2, 3, 6), (2, 3, 6), (6,)]),
    "add_rms_norm_sum_only": (lambda x, r, w: ops.add_rms_norm(x, r, (6,), w)[0].sin(), [(2, 3, 6), (2, 3, 6), (6,)]),
    "gelu": (ops.gelu, [(3, 5)]),
    "gelu_tanh": (lambda x: ops.gelu(x, approximate="tanh"), [(3, 5)]),
    "swiglu": (ops.swiglu, [(3, 5), (3, 5)]),
    "geglu": (ops.geglu, [(3, 5), (3, 5)]),
    "geglu_tanh": (lambda g, u: ops.geglu(g, u, approximate="tanh"), [(3, 5), (3, 5)]),
    "rotary": (lambda q, k: torch.add(*_rotary(q, k)), [(2, 3, 4, 6), (2, 1, 4, 6)]),
    "rotary_interleaved_q_only": (lambda q, k: _rotary(q, k, interleaved=True)[0], [(2, 3, 4, 6), (2, 1, 4, 6)]),
    "linear": (ops.linear, [(2, 3, 5), (4, 5), (4,)]),
    "linear_no_bias": (ops.linear, [(3, 5), (4, 5)]),
    "dropout": (_seeded(lambda x: ops.dropout(x, 0.3)), [(4, 6)]),
    "attention": (lambda q, k, v: ops.scaled_dot_product_attention(q, k, v), [(1, 2, 4, 3), (1, 2, 5, 3), (1, 2, 5, 4)]),
    "attention_causal": (lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
                         [(1, 2, 5, 3), (1, 2, 5, 3), (1, 2, 5, 3)]),
    "attention_dropout": (_seeded(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3,
                                                                                   is_causal=True)),
                          [(1, 2, 4, 3), (1, 2, 5, 3), (1, 2, 5, 4)]),
    # a padding mask, a sliding window and grouped-query attention (two query heads per key/value head)
    "attention_masked_gqa_window": (
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, torch.tensor([[True] * 4 + [False]]), is_causal=True,
                                                         enable_gqa=True, window=3),
        [(1, 4, 5, 3), (1, 2, 5, 3), (1, 2, 5, 4)]),
}


@pytest.mark.parametrize("name", CASES)
def test_gradgradcheck_float64(name):
    fn, shapes = CASES[name]
    assert torch.autograd.gradgradcheck(fn, _leaves(*shapes), fast_mode=True)


@pytest.mark.parametrize("name", CASES)
def test_gradients_keep_their_graph(name):
    # the reproduction: g.requires_grad was False
    fn, shapes = CASES[name]
    x, *rest = _leaves(*shapes, dtype=torch.float32)
    out = fn(x, *rest)
    out = out if isinstance(out, torch.Tensor) else out[1]
    g, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    assert g.requires_grad


def test_first_order_gradients_stay_detached():
    # without create_graph the kernels' backward runs and builds no graph
    x, w = _leaves((4, 6), (6,), dtype=torch.float32)
    g, = torch.autograd.grad(ops.layer_norm(x, (6,), w).pow(2).sum(), x)
    assert not g.requires_grad


def _penalty_weight_grads(linear, layer_norm, gelu, x, w, b, lw, lb):
    """A gradient penalty, |d loss / d x|^2, and its gradient with respect to the parameters."""
    params = [t.detach().clone().requires_grad_() for t in (w, b, lw, lb)]
    x = x.detach().clone().requires_grad_()
    w, b, lw, lb = params
    loss = gelu(linear(layer_norm(x, (x.shape[-1],), lw, lb), w, b)).pow(2).sum()
    g, = torch.autograd.grad(loss, x, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), params)


def test_gradient_penalty_matches_torch():
    x, w, b, lw, lb = _leaves((8, 16), (12, 16), (12,), (16,), (16,), dtype=torch.float32)
    ours = _penalty_weight_grads(ops.linear, ops.layer_norm, ops.gelu, x, w, b, lw, lb)
    theirs = _penalty_weight_grads(F.linear, F.layer_norm, F.gelu, x, w, b, lw, lb)
    ref = _penalty_weight_grads(F.linear, F.layer_norm, F.gelu, *(t.double() for t in (x, w, b, lw, lb)))
    for name, o, t, r in zip(["dweight", "dbias", "dln_weight", "dln_bias"], ours, theirs, ref):
        assert_parity(name, o, t, r)


def test_attention_gradient_penalty_matches_torch():
    q, k, v = _leaves((2, 2, 8, 4), (2, 2, 8, 4), (2, 2, 8, 4), dtype=torch.float32)

    def run(sdpa, q, k, v):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        g, = torch.autograd.grad(sdpa(q, k, v, is_causal=True).pow(2).sum(), q, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), (k, v))

    # torch's fused CPU attention has no double backward: torch's is its textbook (math) attention
    ours = run(ops.scaled_dot_product_attention, q, k, v)
    theirs = run(attention_reference, q, k, v)
    ref = run(attention_reference, q.double(), k.double(), v.double())
    for name, o, t, r in zip(["dk", "dv"], ours, theirs, ref):
        assert_parity(name, o, t, r)
