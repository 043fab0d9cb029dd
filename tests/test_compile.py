"""The ops inside torch.compile(fullgraph=True) on the CPU: the graph holds the custom ops."""
import torch

from nanofast import ops


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def f(x, w, b, q, k, v):
        h = ops.layer_norm(x, (x.shape[-1],), w, b)
        return ops.scaled_dot_product_attention(q * h.mean(), k, v, is_causal=True).sum() + h.sum()

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(4, 32, generator=g), torch.randn(32, generator=g), torch.randn(32, generator=g)]
    args += [torch.randn(2, 3, 17, 8, generator=g) for _ in range(3)]
    _assert_compiled_matches_eager(f, args)


def _assert_compiled_matches_eager(f, args):
    """f(*args) and its gradients, compiled with fullgraph=True (aot_eager) and in eager mode."""
    eager_args = [a.clone().requires_grad_() for a in args]
    compiled_args = [a.clone().requires_grad_() for a in args]
    eager = f(*eager_args)
    eager.backward()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled_args)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)


def test_compile_inductor():
    torch._dynamo.reset()

    def f(x, w, q):
        h = ops.layer_norm(x, (x.shape[-1],), w)
        return ops.scaled_dot_product_attention(q, q, q, is_causal=True) * h.mean()

    x, w, q = torch.randn(4, 16), torch.randn(16), torch.randn(1, 2, 9, 8)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, w, q), f(x, w, q))


def test_gpt_compiles_fullgraph_with_the_fused_ops():
    # nanofast-train compiles the model by default (--compile=True): the blocks' fused residual adds,
    # the autocast query in LayerNorm.add_norm and the ops must all trace into one graph
    import contextlib

    from nanofast.model import GPT, GPTConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=37, bias=False, dropout=0.0)
    X, Y = torch.randint(37, (3, 16)), torch.randint(37, (3, 16))
    for dtype in (torch.float32, torch.bfloat16):
        eager = GPT(cfg)
        compiled = GPT(cfg)
        compiled.load_state_dict(eager.state_dict())
        run = torch.compile(compiled, fullgraph=True, backend="aot_eager")
        ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.amp.autocast("cpu", dtype=dtype)
        with ctx:
            loss_c, loss_e = run(X, Y)[1], eager(X, Y)[1]
        loss_c.backward()
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
        for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_compile_fullgraph_current_model_layers():
    # the layers of Llama-style models (RMSNorm, add + RMSNorm, SwiGLU, GEGLU, the tanh GELU, the rotary
    # embedding) recorded as custom ops, with a backward
    torch._dynamo.reset()

    def f(x, r, w):
        h, y = ops.add_rms_norm(x, r, (x.shape[-1],), w, 1e-6, cast_before_weight=True)
        z = ops.rms_norm(y, (x.shape[-1],), w, weight_offset=1.0)
        m = ops.swiglu(z, h) + ops.geglu(h, z, approximate="tanh") + ops.gelu(z, approximate="tanh")
        angles = torch.arange(x.shape[1], dtype=x.dtype)[:, None] * torch.ones(x.shape[-1] // 2)  # (T, D / 2)
        emb = torch.cat((angles, angles), dim=-1)[None]  # (1, T, D), as LlamaRotaryEmbedding returns
        q, k = ops.apply_rotary_pos_emb(m[:, None], h[:, None], emb.cos(), emb.sin())
        return (q * k).sum()

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 32, generator=g), torch.randn(32, generator=g)]
    _assert_compiled_matches_eager(f, args)
