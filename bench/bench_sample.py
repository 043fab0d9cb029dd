"""Sampling benchmark: tokens per second of GPT.generate with its key/value cache (float32, and bfloat16
weights under autocast, as nanofast-sample --dtype=bfloat16 runs on the CPU) against Hugging Face
transformers' GPT2LMHeadModel.generate with its own cache, at GPT-2 124M's shape (12 layers, 12 heads,
768 dims, 1024 positions, 50257 tokens) with random weights, batch 1, 200 new tokens from a one-token
prompt; and the time of one decode step at context lengths up to 1024. Run with
`pytest --benchmark -k sample` (transformers is needed: the cases skip without it).

Both models hold the same weights (nanofast's is loaded from the Hugging Face model's state dict), and
the Hugging Face model uses the exact GELU, nanoGPT's, so that before timing each case checks its
logits against the float64 model's by the parity rule. The report's rate is tokens per second (work
is tokens * 1e9 because the report divides by 1e9), its time column the time per token; "torch" is
Hugging Face's generate in the same dtype (bfloat16: its weights and activations in bfloat16).
"""
import copy
import importlib
import importlib.util
import os
import statistics
import sys
import time
from contextlib import nullcontext

import pytest
import torch

from nanofast import generation
from nanofast.generation import KVCache, cast_weights_to_bfloat16, forward_cached
from nanofast.model import GPT
from nanofast.testing import assert_parity

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_transformers():
    """transformers, or a skip. It imports Hugging Face's `kernels` package, which this repository's
    kernels/ folder (installed as nanofast.kernels) shadows where the repository's root is on sys.path,
    as pytest puts it there: so Hugging Face's is imported first, from the rest of sys.path."""
    saved = sys.path[:]
    if getattr(sys.modules.get("kernels"), "__file__", "").startswith(_ROOT):
        del sys.modules["kernels"]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]
    try:
        if importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
        return pytest.importorskip("transformers", reason="the sampling benchmark compares with transformers")
    finally:
        sys.path[:] = saved


transformers = _import_transformers()

NEW_TOKENS = 200
STEPS_PER_ROUND = 8
# decode steps after this many cached positions (each round adds STEPS_PER_ROUND, up to 1024)
CONTEXTS = [1, 128, 256, 512, 1024 - STEPS_PER_ROUND]


def _models():
    """(Hugging Face's GPT2LMHeadModel, nanofast's GPT) with the same random weights, float32, eval."""
    torch.manual_seed(1337)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(activation_function="gelu")).eval()
    ours = GPT.from_hf_state_dict(hf.state_dict(), "gpt2").eval()
    return hf, ours


@pytest.fixture(scope="module")
def models():
    hf, ours = _models()
    ref = GPT.from_hf_state_dict(hf.state_dict(), "gpt2").double().eval()
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ours16 = cast_weights_to_bfloat16(GPT.from_hf_state_dict(hf.state_dict(), "gpt2").eval())
    return {torch.float32: (hf, ours), torch.bfloat16: (hf16, ours16)}, ref


def _autocast(dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)


@torch.no_grad()
def _check_logits(hf, ours, ref, dtype):
    """Teacher-forced next-token logits over 24 tokens: nanofast's (a prefill, then cached steps)
    against the float64 model's, with Hugging Face's in the same dtype as the baseline."""
    tokens = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(0))
    cache = KVCache(ours.config.n_layer, ours.config.block_size)
    with _autocast(dtype):
        got = [forward_cached(ours, tokens[:, :8], cache)]
        got += [forward_cached(ours, tokens[:, t:t + 1], cache) for t in range(8, 24)]
    got = torch.stack(got, 1).float()
    theirs = hf(tokens).logits[:, 7:].float()
    want = torch.stack([ref(tokens[:, :t + 1])[0][:, -1] for t in range(7, 24)], 1)
    assert_parity(f"logits ({dtype})", got, theirs, want, atol=1e-4 if dtype == torch.float32 else 3e-2)


def _rounds(runs, rounds):
    """{side: median seconds}: the sides take turns, round after round, so that a drift of the machine's
    speed (other processes share its cores) hits all alike."""
    times = {side: [] for side in runs}
    for side, run in runs.items():  # warm-up
        run()
    for _ in range(rounds):
        for side, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[side].append(time.perf_counter() - t0)
    return {side: statistics.median(ts) for side, ts in times.items()}


def test_sample_generate(record, models):
    """200 new tokens from one, batch 1, sampling at temperature 1 over the whole vocabulary."""
    sides, ref = models
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = {}
    for dtype, (hf, ours) in sides.items():
        _check_logits(hf, ours, ref, dtype)

        def nanofast_run(ours=ours, dtype=dtype):
            with torch.no_grad(), _autocast(dtype):
                out = ours.generate(prompt, NEW_TOKENS, temperature=1.0, top_k=None)
            assert out.shape == (1, 1 + NEW_TOKENS)

        def hf_run(hf=hf):
            with torch.no_grad():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                                  temperature=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  pad_token_id=0, use_cache=True)
            assert out.shape == (1, 1 + NEW_TOKENS)

        runs[("nanofast", dtype)], runs[("torch", dtype)] = nanofast_run, hf_run
    torch.manual_seed(0)
    times = _rounds(runs, rounds=3)
    for (provider, dtype), seconds in times.items():
        record.seconds(seconds / NEW_TOKENS, 3, op="sample: generate", case="GPT-2 124M B1 200 tokens from 1",
                       mode="KV cache", dtype=dtype, provider=provider, device="cpu", work=1e9, unit="tok/s")
    hf32 = times[("torch", torch.float32)]
    for dtype in (torch.float32, torch.bfloat16):
        print(f"\nsample: nanofast {dtype} {NEW_TOKENS / times[('nanofast', dtype)]:.1f} tok/s = "
              f"{hf32 / times[('nanofast', dtype)]:.2f}x Hugging Face float32 ({NEW_TOKENS / hf32:.1f} tok/s)")


@torch.no_grad()
def _nanofast_steps(ours, dtype, context):
    """A function timing STEPS_PER_ROUND decode steps after `context` cached positions."""
    cache = KVCache(ours.config.n_layer, ours.config.block_size)
    tokens = torch.randint(0, 50257, (1, context + STEPS_PER_ROUND), generator=torch.Generator().manual_seed(1))
    with _autocast(dtype):
        forward_cached(ours, tokens[:, :context], cache)

    def run():
        for layer in cache.layers:
            layer.length = context  # drop the previous round's steps
        with torch.no_grad(), _autocast(dtype):
            for t in range(context, context + STEPS_PER_ROUND):
                forward_cached(ours, tokens[:, t:t + 1], cache)
    return run


@torch.no_grad()
def _hf_steps(hf, context):
    tokens = torch.randint(0, 50257, (1, context + STEPS_PER_ROUND), generator=torch.Generator().manual_seed(1))
    past = hf(tokens[:, :context], use_cache=True).past_key_values

    def run():
        extra = past.get_seq_length() - context  # drop the previous round's steps
        if extra:
            past.crop(-extra)  # (a negative count removes that many positions, in transformers 4 and 5)
        with torch.no_grad():
            for t in range(context, context + STEPS_PER_ROUND):
                hf(tokens[:, t:t + 1], past_key_values=past, use_cache=True)
    return run


def test_sample_fused_blocks_lever(record, models):
    """A decode step with the blocks fused (nanofast/fused_block.py, with their layer's cache) against the
    same kernels called module by module (GPT.use_fused_blocks(False)): at batch 1 each product is one
    row, so the Python between the kernels is a visible share of the step. Both give the same logits
    (tests/test_generation.py)."""
    sides, _ = models
    context = CONTEXTS[1]
    for dtype, (_, ours) in sides.items():
        runs = {}
        for side in ("with", "without"):
            steps = _nanofast_steps(ours, dtype, context)

            def run(steps=steps, fused=side == "with"):
                ours.use_fused_blocks(fused)
                steps()
            runs[side] = run
        try:
            times = _rounds(runs, rounds=5)
        finally:
            ours.use_fused_blocks(True)
        for side, seconds in times.items():
            record.seconds(seconds / STEPS_PER_ROUND, 5, op="sample: decode step, fused blocks",
                           case=f"GPT-2 124M B1 context={context}", mode="KV cache", dtype=dtype, provider=side,
                           device="cpu", work=1e9, unit="tok/s")
        print(f"\nsample: decode step {dtype}: fused blocks {times['with'] / STEPS_PER_ROUND * 1e3:.2f} ms, "
              f"per-op {times['without'] / STEPS_PER_ROUND * 1e3:.2f} ms ({times['without'] / times['with']:.3f}x)")


def test_sample_draw(record):
    """The draw of each new token from GPT-2's 50257 probabilities: generation.multinomial (torch.rand's
    uniforms, the logarithm only where an entry can win: csrc/multinomial.h) against torch.multinomial,
    which Hugging Face's generate and nanoGPT's sample.py call; the same tokens and generator state
    (tests/test_generation.py)."""
    for B in (1, 4):
        probs = torch.softmax(torch.randn(B, 50257, generator=torch.Generator().manual_seed(B)), dim=-1)
        draws = 50

        def ours():
            for _ in range(draws):
                generation.multinomial(probs)

        def theirs():
            for _ in range(draws):
                torch.multinomial(probs, 1)
        times = _rounds({"nanofast": ours, "torch": theirs}, rounds=5)
        for provider, seconds in times.items():
            record.seconds(seconds / draws, 5, op="sample: draw", case=f"B{B} x 50257 tokens", mode="multinomial",
                           dtype=torch.float32, provider=provider, device="cpu", work=B * 1e9, unit="draws/s")
        print(f"\nsample: draw B{B}: {times['nanofast'] / draws * 1e6:.0f} us, torch.multinomial "
              f"{times['torch'] / draws * 1e6:.0f} us ({times['torch'] / times['nanofast']:.2f}x)")


def test_sample_time_per_token_by_context(record, models):
    """One decode step (batch 1) after 1 to 1016 cached positions: with the cache the weights dominate,
    so the time per token should stay flat as the context grows."""
    sides, _ = models
    by_context = {}
    for context in CONTEXTS:
        runs = {}
        for dtype, (hf, ours) in sides.items():
            runs[("nanofast", dtype)] = _nanofast_steps(ours, dtype, context)
            runs[("torch", dtype)] = _hf_steps(hf, context)
        by_context[context] = _rounds(runs, rounds=3)
        for (provider, dtype), seconds in by_context[context].items():
            record.seconds(seconds / STEPS_PER_ROUND, 3, op="sample: decode step", case=f"sweep:context={context}",
                           mode="KV cache", dtype=dtype, provider=provider, device="cpu", work=1e9, unit="tok/s")
    first, last = by_context[CONTEXTS[0]], by_context[CONTEXTS[-1]]
    for side in first:
        print(f"\nsample: decode step {side[0]} {side[1]}: {first[side] / STEPS_PER_ROUND * 1e3:.1f} ms after "
              f"{CONTEXTS[0]} position(s), {last[side] / STEPS_PER_ROUND * 1e3:.1f} ms after {CONTEXTS[-1]} "
              f"({last[side] / first[side]:.2f}x)")
