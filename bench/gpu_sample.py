"""Sampling on CUDA (run by bench/gpu_check.sh): tokens per second of GPT.generate with its key/value
cache and without it, and of Hugging Face's GPT2LMHeadModel.generate where transformers is installed, at
GPT-2 124M's shape with random weights, batch 1, 200 new tokens from a one-token prompt, float32 and
bfloat16 autocast; and one decode step's time after a short and a long context (flat with the cache).
The CPU side of the same measurements is bench/bench_sample.py. Writes a markdown table to --out.

    python bench/gpu_sample.py --out bench/results/gpu_sample.md
"""
import argparse
import time

import torch

from nanofast.generation import KVCache, forward_cached
from nanofast.model import GPT, GPTConfig

NEW_TOKENS = 200
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True, dropout=0.0)


def seconds(fn, rounds=3):
    """The best of `rounds` timed calls after one warm-up call, the GPU drained before each clock read."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def hf_model():
    try:
        import transformers
    except ImportError:
        return None
    torch.manual_seed(1337)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(activation_function="gelu")).cuda().eval()


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu_sample.md")
    args = parser.parse_args()
    torch.manual_seed(1337)
    ours = GPT(GPTConfig(**GPT2, kernels="nanofast")).cuda().eval()
    hf = hf_model()
    prompt = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        sides = {"nanofast, KV cache": lambda: ours.generate(prompt, NEW_TOKENS, top_k=None),
                 "nanofast, no cache": lambda: ours.generate(prompt, NEW_TOKENS, top_k=None, use_cache=False)}
        if hf is not None:
            sides["Hugging Face generate"] = lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS, pad_token_id=0, use_cache=True)
        for side, run in sides.items():
            with autocast:
                s = seconds(run)
            rows.append(f"| generate: {side} | {str(dtype)[6:]} | {NEW_TOKENS / s:.0f} | {s / NEW_TOKENS * 1e3:.2f} |")
            print(rows[-1], flush=True)
        for context in (1, 1016):  # one decode step after `context` cached positions
            cache = KVCache(ours.config.n_layer, ours.config.block_size)
            tokens = torch.randint(0, 50257, (1, context + 8), device="cuda")
            with autocast:
                forward_cached(ours, tokens[:, :context], cache)

            def steps(cache=cache, tokens=tokens, context=context):
                for layer in cache.layers:
                    layer.length = context
                for t in range(context, context + 8):
                    forward_cached(ours, tokens[:, t:t + 1], cache)
            with autocast:
                s = seconds(steps) / 8
            rows.append(f"| decode step after {context} positions | {str(dtype)[6:]} | {1 / s:.0f} | {s * 1e3:.2f} |")
            print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        f.write(f"GPU: {torch.cuda.get_device_name()} | GPT-2 124M shape, random weights, batch 1, {NEW_TOKENS} new "
                "tokens from one\n\n| case | dtype | tokens/s | ms/token |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
