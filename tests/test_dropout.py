import numpy as np
import pytest
import torch

from nanofast import ops
from nanofast.ops.seed import draw_seed
from nanofast.testing import assert_parity, attention_reference
from philox_ref import dropout_mask_ref, uniform


def test_generator_matches_the_published_values():
    # tl.rand(1234, offsets 0..3) as Triton computes it.
    # (printed to 7 digits)
    np.testing.assert_allclose(uniform(1234, np.arange(4)), [0.2544159, 0.7583353, 0.4983454, 0.5769469],
                               rtol=0, atol=5e-8)


@pytest.mark.parametrize("seed", [0, 1234, 2**32 + 5, 2**62 - 1])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 17, 33), (1, 2, 64, 64)])
def test_mask_matches_reference_bit_for_bit(seed, shape):
    ours = ops.dropout_mask(seed, *shape, 0.2)
    assert ours.dtype == torch.bool and ours.shape == shape
    np.testing.assert_array_equal(ours.numpy(), dropout_mask_ref(seed, *shape, 0.2))


def test_offsets_beyond_32_bits():
    # Large (B, H, T, T) products put offsets past 2**32, where the counter's high word is used.
    from nanofast import _C

    seed = 2**40 + 99
    offsets = np.array([0, 1, 2**32 - 1, 2**32, 2**32 + 12345, 2**45 + 7, 2**63 + 5], dtype=np.uint64)
    ours = np.array([_C.philox_uniform(seed, int(o)) for o in offsets], dtype=np.float32)
    np.testing.assert_array_equal(ours, uniform(seed, offsets))


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keep_rate(p):
    mask = ops.dropout_mask(7, 4, 6, 256, 256, p)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01


def test_p_zero_keeps_everything():
    assert ops.dropout_mask(3, 2, 2, 8, 8, 0.0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_applies_exactly_that_mask(causal, dtype):
    B, H, T, D, p = 2, 3, 45, 24, 0.3
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(4))
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    seed = int(draw_seed().item())
    torch.manual_seed(11)
    out = ops.scaled_dot_product_attention(*leaves, dropout_p=p, is_causal=causal)
    out.backward(dout.to(dtype))
    keep = ops.dropout_mask(seed, B, H, T, T, p)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_leaves, is_causal=causal, keep=keep, p=p)
    ref.backward(dout)
    # torch's own dropout draws another mask, so the float32 comparison uses a float32 run of the reference.
    f_leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    f_ref = attention_reference(*f_leaves, is_causal=causal, keep=keep, p=p)
    f_ref.backward(dout.to(dtype))
    for name, o, f, r in zip(["out", "dq", "dk", "dv"], [out.detach()] + [t.grad for t in leaves],
                             [f_ref.detach()] + [t.grad for t in f_leaves], [ref.detach()] + [t.grad for t in ref_leaves]):
        assert_parity(name, o, f, r)


def test_manual_seed_reproduces_dropout():
    q = torch.randn(1, 2, 16, 8)
    torch.manual_seed(5)
    a = ops.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(5)
    b = ops.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    c = ops.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("args,match", [
    ((1, 1, 1, 2, 2, 1.0), r"p must be in \[0, 1\)"),
    ((1, -1, 1, 2, 2, 0.5), r"batch must be >= 0"),
    ((-1, 1, 1, 2, 2, 0.5), r"seed must be in"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.dropout_mask(*args)
