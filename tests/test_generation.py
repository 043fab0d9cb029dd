"""Sampling with a key/value cache (nanofast.generation, GPT.generate): the same tokens and logits as
recomputing the whole context, cropping past block_size, batches, both backends' attention."""
import importlib.util
import re
from contextlib import nullcontext

import pytest
import torch

from nanofast import _C, fused_block, generation
from nanofast.generation import KVCache, LayerCache, cast_weights_to_bfloat16, forward_cached
from nanofast.model import GPT, GPTConfig
from nanofast.ops import cpu
from nanofast.testing import assert_parity

KERNELS = ["nanofast", "torch"]
VOCAB = 37


def tiny_model(kernels="nanofast", seed=0, **kw):
    args = dict(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True,
                kernels=kernels)
    args.update(kw)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**args)).eval()


def both_ways(model, idx, n, seed, **kw):
    """generate with and without the cache, from the same seed."""
    torch.manual_seed(seed)
    cached = model.generate(idx, n, **kw)
    torch.manual_seed(seed)
    return cached, model.generate(idx, n, use_cache=False, **kw)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.8, 5), (1.5, 20), (0.0, None)])
def test_same_tokens_as_without_cache(kernels, batch, temperature, top_k):
    model = tiny_model(kernels)
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        for prompt_len in (1, 7, 20):  # 20 > block_size: the prompt itself is cropped
            idx = torch.randint(0, VOCAB, (batch, prompt_len), generator=g)
            cached, uncached = both_ways(model, idx, 25, seed, temperature=temperature, top_k=top_k)
            assert cached.shape == (batch, prompt_len + 25) and torch.equal(cached[:, :prompt_len], idx)
            assert torch.equal(cached, uncached), (seed, prompt_len)


@pytest.mark.parametrize("batch", [1, 3])
def test_same_tokens_through_the_matrix_vector_kernel(batch):
    """Weights large enough that a step's products run nanofast's matrix-vector kernel (ops/cpu.py:
    uses_gemv), while the prefill's and the uncached path's rows run the GEMM or torch's matmul."""
    model = tiny_model(n_embd=128, n_head=4, vocab_size=300)
    assert cpu.uses_gemv(batch, 4 * 128, 128, torch.float32) == _C.has_gemv()
    idx = torch.randint(0, 300, (batch, 6), generator=torch.Generator().manual_seed(3))
    for seed in range(2):
        cached, uncached = both_ways(model, idx, 14, seed, temperature=1.0, top_k=50)
        assert torch.equal(cached, uncached)


def teacher_forced_logits(model, tokens, use_cache):
    """The next-token logits (B, T, vocab) after each prefix tokens[:, :t + 1], t < T <= block_size: with
    the cache, a prefill of the first token and then one step per token."""
    if not use_cache:
        return torch.stack([model(tokens[:, :t + 1])[0][:, -1] for t in range(tokens.shape[1])], dim=1)
    cache = KVCache(model.config.n_layer, model.config.block_size)
    return torch.stack([forward_cached(model, tokens[:, t:t + 1], cache) for t in range(tokens.shape[1])], dim=1)


@pytest.mark.parametrize("kernels", KERNELS)
def test_logits_match_within_parity_rule(kernels):
    """Cached float32 logits against the float64 model's: at most twice the error of the uncached
    float32 logits (nanofast.testing's rule), at every position of a full block."""
    model = tiny_model(kernels, seed=3)
    tokens = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cached = teacher_forced_logits(model, tokens, True)
        uncached = teacher_forced_logits(model, tokens, False)
        ref = teacher_forced_logits(model.double(), tokens, False)
    assert_parity("cached logits", cached, uncached, ref)


def test_prefill_then_steps_match_one_prefill():
    model = tiny_model(seed=5)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = KVCache(model.config.n_layer, model.config.block_size)
        forward_cached(model, tokens[:, :5], cache)
        for t in range(5, 8):
            forward_cached(model, tokens[:, t:t + 1], cache)
        stepped = forward_cached(model, tokens[:, 8:], cache)
        whole = forward_cached(model, tokens, KVCache(model.config.n_layer, model.config.block_size))
    assert cache.length == 9
    torch.testing.assert_close(stepped, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, model(tokens)[0][:, -1], rtol=1e-5, atol=1e-5)


def test_cache_is_rebuilt_past_block_size(monkeypatch):
    """Past block_size each step is a prefill of the last block_size tokens: the cached keys and values
    were computed at other positions, so they cannot be shifted."""
    model = tiny_model()
    calls = []
    real = generation.forward_cached

    def spy(model, idx, cache):
        calls.append((cache.length, idx.shape[1]))
        return real(model, idx, cache)

    monkeypatch.setattr(generation, "forward_cached", spy)
    model.generate(torch.zeros(2, 13, dtype=torch.long), 6)
    # prefill of 13, steps at 13, 14, 15 cached positions, then full: rebuilt from 16 tokens twice
    assert calls == [(0, 13), (13, 1), (14, 1), (15, 1), (0, 16), (0, 16)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_needs_a_token_to_continue_from(use_cache):
    model = tiny_model()
    for idx in (torch.zeros(2, 0, dtype=torch.long), torch.zeros(5, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"at least one token .* got shape " + re.escape(str(tuple(idx.shape)))):
            model.generate(idx, 3, use_cache=use_cache)
    assert model.generate(torch.zeros(2, 1, dtype=torch.long), 0, use_cache=use_cache).shape == (2, 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=0), "top_k must be None .* got 0"),
    (dict(top_k=-3), "top_k must be None .* got -3"),
    (dict(top_k=2.5), "top_k must be None .* got 2.5"),
    (dict(top_k=True), "top_k must be None .* got True"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0 .* got -0.5"),
    (dict(temperature=float("nan")), "temperature must be .* got nan"),
    (dict(temperature=float("inf")), "temperature must be .* got inf"),
    (dict(temperature="hot"), "temperature must be .* got 'hot'"),
    (dict(idx=torch.tensor([[3, VOCAB]])), rf"token id {VOCAB}, outside the model's vocabulary \[0, {VOCAB}\)"),
    (dict(idx=torch.tensor([[-1, 2]])), "token id -1, outside"),
    (dict(idx=torch.zeros(1, 2)), "integer token ids, got torch.float32"),
])
def test_generate_names_a_bad_argument(kwargs, match):
    model = tiny_model()
    idx = kwargs.pop("idx", torch.zeros(2, 1, dtype=torch.long))
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=match):
            model.generate(idx, 3, use_cache=use_cache, **kwargs)


def test_generate_takes_what_it_always_took():
    """The bounds of each argument, and integer-likes: int32 ids, a numpy top_k, temperature 0."""
    np = pytest.importorskip("numpy")
    model = tiny_model()
    ids = torch.tensor([[0, VOCAB - 1]], dtype=torch.int32)
    for kwargs in (dict(top_k=1), dict(top_k=np.int64(VOCAB + 5)), dict(temperature=0), dict(temperature=0.0),
                   dict(temperature=2)):
        out = model.generate(ids, 2, **kwargs)
        assert out.shape == (1, 4) and 0 <= int(out.min()) and int(out.max()) < VOCAB
    for use_cache in (True, False):  # a batch of no sequences
        assert model.generate(torch.zeros(0, 3, dtype=torch.long), 2, use_cache=use_cache).shape == (0, 5)


def test_layer_cache_rejects_what_it_cannot_hold():
    layer = LayerCache(4)
    k = torch.zeros(1, 2, 3, 8)
    keys, values = layer.append(k, k)
    assert keys.shape == (1, 2, 3, 8) and layer.length == 3
    with pytest.raises(ValueError, match="one position per step"):
        layer.append(k, k)
    layer.append(k[:, :, :1], k[:, :, :1])
    with pytest.raises(ValueError, match="capacity 4"):
        layer.append(k[:, :, :1], k[:, :, :1])


def test_bfloat16_autocast_logits_match_within_parity_rule():
    """Under bfloat16 autocast the layers' keys are bfloat16, and so is the cache; the cached logits keep
    the parity rule against the float64 model, with the uncached autocast logits as the baseline."""
    model = tiny_model(seed=7)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache = KVCache(model.config.n_layer, model.config.block_size)
            forward_cached(model, tokens[:, :1], cache)
            assert cache.layers[0].k.dtype == torch.bfloat16
            cached = teacher_forced_logits(model, tokens, True)
            uncached = teacher_forced_logits(model, tokens, False)
        ref = teacher_forced_logits(model.double(), tokens, False)
    assert cached.dtype == uncached.dtype == torch.bfloat16
    assert_parity("cached logits under autocast", cached, uncached, ref)


@pytest.mark.parametrize("kernels", KERNELS)
def test_bfloat16_weights_give_autocasts_tokens_and_logits(kernels):
    """Weights stored in bfloat16 are what autocast rounds the float32 ones to before each product: the
    same logits, bit for bit, and the same tokens, through the matrix-vector kernel and the GEMMs."""
    model = tiny_model(kernels, n_embd=128, n_head=4, vocab_size=300)
    cast = cast_weights_to_bfloat16(tiny_model(kernels, n_embd=128, n_head=4, vocab_size=300))
    assert cast.lm_head.weight.dtype == torch.bfloat16 and cast.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert cast.transformer.wte.weight.dtype == torch.float32  # the embedding keeps its float32 values
    assert cast.transformer.h[0].mlp.c_fc.bias.dtype == torch.float32
    tokens = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for use_cache in (True, False):
            assert torch.equal(teacher_forced_logits(cast, tokens, use_cache),
                               teacher_forced_logits(model, tokens, use_cache))
        for seed in range(2):
            torch.manual_seed(seed)
            want = model.generate(tokens[:, :4], 20, temperature=0.9, top_k=40)
            torch.manual_seed(seed)
            assert torch.equal(cast.generate(tokens[:, :4], 20, temperature=0.9, top_k=40), want)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch", [2, cpu.GEMV_MAX_ROWS + 1])
def test_fused_blocks_read_the_cache_as_the_per_op_blocks(monkeypatch, amp_dtype, bias, batch):
    """With grad mode off the blocks run fused (nanofast/fused_block.py) with their layer's cache, in the
    prefill and in every step: the same logits, bit for bit, as the per-op modules (a step's products
    by the matrix-vector kernel, or past its row limit by the GEMMs)."""
    model = tiny_model(n_embd=128, n_head=4, vocab_size=300, bias=bias)
    tokens = torch.randint(0, 300, (batch, 16), generator=torch.Generator().manual_seed(5))
    real, calls = fused_block.forward, []

    def spy(*args, cache=None):
        calls.append(cache)
        return real(*args, cache=cache)

    monkeypatch.setattr(fused_block, "forward", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else nullcontext():
        fused = teacher_forced_logits(model, tokens, True)
        assert len(calls) == 16 * model.config.n_layer and all(isinstance(c, LayerCache) for c in calls)
        model.use_fused_blocks(False)
        per_op = teacher_forced_logits(model, tokens, True)
    assert len(calls) == 16 * model.config.n_layer  # none more
    assert torch.equal(fused, per_op)


def test_cache_with_grad_mode_on_runs_the_per_op_blocks():
    """A cache with grad mode on: the per-op blocks (the fused node's backward knows no cache), the same
    logits; fused_block.forward itself refuses it."""
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = teacher_forced_logits(model, tokens, True)
    got = teacher_forced_logits(model, tokens, True)
    assert got.requires_grad and torch.equal(got, want)
    block, x = model.transformer.h[0], torch.randn(2, 1, 32)
    with pytest.raises(RuntimeError, match="grad mode off"):
        fused_block.forward(x, None, 2, 0.0, *block._fused_parameters(), cache=LayerCache(4))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_same_tokens_with_triton_attention():
    """CUDA's attention path (Triton; on CPU tensors through its interpreter): a decode step's one query
    row against a view of the cache's buffers."""
    import nanofast.kernels as K

    model = tiny_model(block_size=8)
    for block in model.transformer.h:
        block.fused = False
        block.attn.kernel = K.scaled_dot_product_attention
    idx = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(2))
    cached, uncached = both_ways(model, idx, 7, 0, temperature=0.9, top_k=10)
    assert torch.equal(cached, uncached)


# ---- the draw: generation.multinomial is torch.multinomial(probs, 1), bit for bit ----

def _probability_rows(B, V, scale, seed, top_k=None, zero_every=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * scale
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, V)).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if zero_every:
        probs[:, ::zero_every] = 0.0
    return probs


def _drawn_by_the_kernel(probs, generator=None):
    """generation.multinomial(probs) where torch.multinomial may not run: the kernel's own draw."""
    generation._draws_like_torch()  # (the process's check, which calls torch.multinomial, done first)

    def refuse(*args, **kwargs):
        raise AssertionError("generation.multinomial fell back to torch.multinomial")

    real, torch.multinomial = torch.multinomial, refuse
    try:
        return generation.multinomial(probs, generator=generator)
    finally:
        torch.multinomial = real


@pytest.mark.parametrize("B,V", [(1, 1), (1, 2), (1, 7), (3, 65), (2, 257), (1, 50257), (4, 1031)])
@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0, 40.0])
def test_multinomial_draws_torchs_tokens_and_leaves_its_generator_alike(B, V, scale):
    probs = _probability_rows(B, V, scale, seed=V + B)
    for seed in range(6):
        torch.manual_seed(seed)
        want = torch.multinomial(probs, 1)
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        got = _drawn_by_the_kernel(probs)
        assert got.dtype == torch.long and torch.equal(got, want), (seed, got.flatten(), want.flatten())
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("case", ["top_k", "zeros", "unnormalised", "strided", "one_certain", "uniform"])
def test_multinomial_on_the_distributions_sampling_makes(case):
    probs = _probability_rows(3, 500, 2.0, seed=7, top_k=5 if case == "top_k" else None,
                              zero_every=3 if case == "zeros" else None)
    if case == "unnormalised":
        probs = probs * 37.5
    elif case == "strided":
        probs = torch.cat([probs, probs], dim=1)[:, :500]  # rows 1000 apart
        assert probs.stride(0) == 1000
    elif case == "one_certain":
        probs = torch.zeros(3, 500)
        probs[:, 123] = 1.0
    elif case == "uniform":  # equal probabilities: only the uniforms decide
        probs = torch.full((3, 500), 1 / 500)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        want = torch.multinomial(probs, 1, generator=g1)
        assert torch.equal(_drawn_by_the_kernel(probs, generator=g2), want)
    assert torch.equal(g1.get_state(), g2.get_state())
    if case == "one_certain":
        assert (want == 123).all()


def test_multinomial_takes_the_log_of_few_entries():
    """The kernel's premise: a sampled row needs the exact exponential of one or two entries, so the
    call costs about torch.rand's draw. Counted by replaying its bounds in float64."""
    probs = _probability_rows(1, 50257, 1.0, seed=3)
    counts = []
    for seed in range(10):
        u = torch.rand(probs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        p = probs.double()
        threshold = (p * (1 - u) / u).max() * (1 - 1e-5)
        counts.append(int((p >= threshold * u).sum()))
    assert max(counts) <= 8 and sum(counts) / len(counts) < 3, counts


@pytest.mark.parametrize("bad", [float("nan"), -1e-3, float("inf"), "zero_row"])
def test_multinomial_refuses_what_torch_refuses(bad):
    probs = _probability_rows(2, 50, 1.0, seed=1)
    if bad == "zero_row":
        probs[1] = 0.0
        message = "sum of probabilities"
    else:
        probs[1, 17] = bad
        message = "inf.*nan.*element < 0"
    with pytest.raises(RuntimeError, match=message):
        torch.multinomial(probs, 1)
    with pytest.raises(RuntimeError, match=message):
        generation.multinomial(probs)


def test_multinomial_leaves_other_inputs_to_torch(monkeypatch):
    """float64, 1-D and CUDA-less paths: torch.multinomial itself, called with the same generator; and
    when this torch draws otherwise than the kernel assumes (the process's one check fails), every call."""
    calls = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    probs = _probability_rows(2, 30, 1.0, seed=2)
    for p in (probs.double(), probs[0], probs.t().contiguous().t()):
        generation.multinomial(p)
    assert [c.dtype for c in calls] == [torch.float64, torch.float32, torch.float32]
    calls.clear()
    generation.multinomial(probs)
    assert calls == []
    monkeypatch.setattr(generation, "_draws_like_torch", lambda: False)
    generation.multinomial(probs)
    assert len(calls) == 1


@pytest.fixture
def draw_check():
    """generation._draws_like_torch as a test's first call computes it, forgotten after the test (so
    that a mutant's answer is not kept for the rest of the process)."""
    generation._draws_like_torch.cache_clear()
    yield generation._draws_like_torch
    generation._draws_like_torch.cache_clear()


def test_draws_like_torch_on_this_torch(draw_check):
    """The once-per-process check passes with the torch under test (else sampling would fall back to
    torch.multinomial, the same tokens at the old cost), and it would notice another formula."""
    state = torch.get_rng_state()
    assert draw_check()
    assert torch.equal(torch.get_rng_state(), state)  # (its own generators: the first draw's seed stream is intact)


@pytest.mark.parametrize("other", [
    lambda u: u,  # the race without the logarithm: right where the winner's u is small
    lambda u: -torch.log(u),  # exponentials from the other end of the uniforms
])
def test_draws_like_torch_notices_another_formula(monkeypatch, draw_check, other):
    monkeypatch.setattr(cpu, "multinomial_from_uniform",
                        lambda probs, u: torch.argmax(probs / other(u).float(), -1, keepdim=True))
    assert not draw_check()


def test_draws_like_torch_notices_other_uniforms(monkeypatch, draw_check):
    """float32 uniforms (one 32-bit draw each, not two): nearly the same tokens, another generator state."""
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, dtype=None, **k: real(*a, dtype=torch.float32, **k).double())
    assert not draw_check()


def test_generate_draws_the_tokens_torch_multinomial_draws(monkeypatch):
    """GPT.generate with the kernel's draw and with torch.multinomial: the same tokens from one seed."""
    model = tiny_model()
    idx = torch.zeros(2, 1, dtype=torch.long)
    torch.manual_seed(11)
    ours = model.generate(idx, 12, temperature=1.3, top_k=9)
    monkeypatch.setattr(generation, "multinomial", lambda probs: torch.multinomial(probs, 1))
    torch.manual_seed(11)
    assert torch.equal(model.generate(idx, 12, temperature=1.3, top_k=9), ours)
