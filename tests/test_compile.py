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
