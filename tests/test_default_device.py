"""CPU tensors run the same way whatever torch's default device is (torch.set_default_device, or a
`with torch.device(...)` block, as notebooks that build models on a GPU use): the CPU launchers
allocate the kernels' outputs on the CPU, not on the default device, where the C++ kernels would write
through another device's pointer. "meta" stands in for that other device here (its tensors have no
memory at all)."""
import pytest
import torch

import nanofast
from nanofast import ops
from nanofast.model import GPT, GPTConfig
from nanofast.optim import AdamW


@pytest.fixture
def foreign_default_device():
    """Runs the test body's second half with the default device set to meta, restored afterwards."""
    def switch():
        torch.set_default_device("meta")
    yield switch
    torch.set_default_device(None)


def _cpu(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="cpu").to(dtype).requires_grad_()


def _every_op(dtype):
    """Outputs and input gradients of each op on small inputs made on the CPU by name (device="cpu"),
    whatever the default device."""
    torch.manual_seed(0)
    results = []

    def run(name, fn, *inputs):
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(sum(o.float().sum() for o in out), inputs, allow_unused=True)
        results.append((name, [o.detach() for o in out] + [g for g in grads if g is not None]))

    x, r = _cpu(6, 40, dtype=dtype), _cpu(6, 40, dtype=dtype)
    w, b = _cpu(40, dtype=dtype), _cpu(40, dtype=dtype)
    run("layer_norm", lambda x, w, b: ops.layer_norm(x, (40,), w, b), x, w, b)
    run("add_layer_norm", lambda x, r, w, b: ops.add_layer_norm(x, r, (40,), w, b), x, r, w, b)
    run("rms_norm", lambda x, w: ops.rms_norm(x, (40,), w, 1e-6), x, w)
    run("add_rms_norm", lambda x, r, w: ops.add_rms_norm(x, r, (40,), w, 1e-6), x, r, w)
    run("gelu", ops.gelu, x)
    run("gelu_tanh", lambda x: ops.gelu(x, approximate="tanh"), x)
    run("swiglu", ops.swiglu, x, r)
    run("dropout", lambda x: ops.dropout(x, p=0.3), x)
    q, k, v = _cpu(2, 4, 9, 16, dtype=dtype), _cpu(2, 2, 9, 16, dtype=dtype), _cpu(2, 2, 9, 16, dtype=dtype)
    pad = torch.ones(2, 1, 1, 9, dtype=torch.bool, device="cpu")
    pad[0, ..., -3:] = False
    run("attention", lambda q, k, v: ops.scaled_dot_product_attention(
        q, k, v, attn_mask=pad, dropout_p=0.2, enable_gqa=True), q, k, v)
    run("attention_causal", lambda q: ops.scaled_dot_product_attention(q, q, q, is_causal=True), q)
    cos, sin = torch.randn(2, 9, 16, device="cpu").to(dtype), torch.randn(2, 9, 16, device="cpu").to(dtype)
    run("rotary", lambda q, k: ops.apply_rotary_pos_emb(q, k, cos, sin), q, k)
    wl = _cpu(48, 40, dtype=dtype)
    run("linear", ops.linear, x, wl)  # a few rows: the matrix-vector kernel
    xl = _cpu(96, 40, dtype=dtype)
    run("linear_gemm", ops.linear, _cpu(700, 96, dtype=dtype), _cpu(128, 96, dtype=dtype))
    target = torch.randint(48, (96,), device="cpu")
    run("linear_cross_entropy", lambda xl, wl: ops.linear_cross_entropy(xl, wl, target), xl, wl)
    results.append(("dropout_mask", [ops.dropout_mask(7, 2, 3, 5, 5, p=0.4)]))
    return results


def _assert_same(expected, got):
    assert [name for name, _ in expected] == [name for name, _ in got]
    for (name, a), (_, b) in zip(expected, got):
        assert len(a) == len(b), name
        for s, t in zip(a, b):
            assert t.device.type == "cpu", name
            assert torch.equal(s, t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_ops_under_another_default_device(foreign_default_device, dtype):
    expected = _every_op(dtype)
    foreign_default_device()
    _assert_same(expected, _every_op(dtype))


def _train(model, steps=2):
    torch.manual_seed(1)
    opt = AdamW(model.parameters(), lr=1e-2)
    X, Y = (torch.randint(50, (2, 16), device="cpu") for _ in range(2))
    losses = []
    for dtype in (torch.float32, torch.bfloat16)[:steps]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            _, loss = model(X, Y)
        loss.backward()
        norm = opt.step(max_grad_norm=1.0)
        opt.zero_grad(set_to_none=True)
        losses += [loss.detach(), norm]
    with torch.no_grad():
        sample = model.eval().generate(X[:, :3], 5)
    model.train()
    return losses + [sample] + [p.detach().clone() for p in model.parameters()]


def test_training_under_another_default_device(foreign_default_device):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=True, dropout=0.1)
    model = GPT(cfg)
    twin = GPT(cfg)
    twin.load_state_dict(model.state_dict())
    expected = _train(model)  # the fused blocks, the fused loss, AdamW in C++, sampling with the cache
    foreign_default_device()
    got = _train(twin)
    for a, b in zip(expected, got):
        assert b.device.type == "cpu" and torch.equal(a, b)


def test_patch_under_another_default_device(foreign_default_device):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(64, (2, 8), device="cpu")
    with torch.no_grad():
        expected = model(ids).logits
    foreign_default_device()
    patched = nanofast.patch(model)  # its check of the model's rotary function runs on the CPU
    with torch.no_grad():
        assert torch.allclose(patched(ids).logits, expected, atol=1e-5)


def test_backward_launchers_under_another_default_device(foreign_default_device):
    # autograd runs the backward without torch's device mode, so call the launchers themselves: each
    # allocates its gradients, parameter gradients included, on the CPU
    from nanofast.ops import cpu
    torch.manual_seed(0)
    x, r, dy = (torch.randn(6, 40, device="cpu") for _ in range(3))
    w, b = torch.randn(40, device="cpu"), torch.randn(40, device="cpu")
    _, mean, rstd = cpu.layer_norm_forward(x, w, b, 1e-5)
    h, _, amean, arstd = cpu.add_layer_norm_forward(x, r, w, b, 1e-5, torch.float32)
    _, _, rrstd = cpu.rms_norm_forward(x, None, w, 1e-6, 0.0, False, torch.float32)
    q = torch.randn(2, 4, 9, 16, device="cpu")
    out, lse = cpu.attention_forward(q, q, q, True, 0.25, 0.0, None)
    cos, sin = torch.randn(2, 1, 9, 16, device="cpu"), torch.randn(2, 1, 9, 16, device="cpu")
    calls = {
        "layer_norm": lambda: cpu.layer_norm_backward(dy, x, w, mean, rstd, True, True),
        "add_layer_norm": lambda: cpu.add_layer_norm_backward(dy, dy, h, w, amean, arstd, torch.float32, True, True),
        "rms_norm": lambda: cpu.rms_norm_backward(dy, None, x, w, rrstd, 0.0, False, None, True),
        "attention": lambda: cpu.attention_backward(q, q, q, q, out, lse, True, 0.25, 0.0, None),
        "gelu": lambda: cpu.gelu_backward(dy, x),
        "glu": lambda: cpu.glu_backward(dy, x, r, "silu"),
        "rotary": lambda: cpu.rotary_backward(q, q, cos, sin, False, torch.float32),
        "linear": lambda: cpu.linear_backward(dy, x, torch.randn(40, 40, device="cpu"), True, True, True),
    }
    expected = {name: call() for name, call in calls.items()}
    foreign_default_device()
    for name, call in calls.items():
        for e, g in zip(expected[name], call()):
            if e is not None:
                assert g.device.type == "cpu", name
                if name != "linear":  # (a fresh random weight)
                    assert torch.equal(e, g), name
