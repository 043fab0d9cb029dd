"""Sampling from a GPT (nanofast.model.GPT.generate): the key/value cache, the forward pass that reads
only new tokens, and the sampling loop.

Without a cache every new token costs a forward pass over the whole context. With one, a prefill pass
over the prompt keeps each layer's keys and values, and each later step reads one token per sequence:
its query attends to the cached keys, and its own key and value join the cache.

Past block_size the context is cropped to its last block_size tokens, as nanoGPT does. The position
embeddings are absolute, so every kept token then sits one position earlier than when its keys and
values were computed, and they depend on that position through every layer: the cache cannot be
shifted, it is rebuilt by a prefill over the cropped context. Each step past block_size therefore
costs what a step without the cache costs, and draws the same tokens.

A step reads every weight once, so on the CPU the weights' bytes bound its speed:
cast_weights_to_bfloat16 halves them for sampling under bfloat16 autocast.
"""
import functools
import math
import operator

import torch
from torch import nn
from torch.nn import functional as F

from .ops import cpu


class LayerCache:
    """One layer's keys and values: (B, n_head, capacity, head_size) buffers, the first `length`
    positions filled. Allocated by the first append, in the dtype of the keys it is given (under
    bfloat16 autocast the layers' keys are bfloat16)."""

    __slots__ = ("capacity", "length", "k", "v")

    def __init__(self, capacity):
        self.capacity = capacity
        self.length = 0
        self.k = self.v = None

    def append(self, k, v):
        """Stores k and v (B, n_head, T, head_size) at the next T positions and returns the keys and
        values of every filled position, views of the buffers. Several positions at once only into an
        empty cache (a prefill): the attention kernels' causal masks are top-left aligned, so later
        positions are added one at a time."""
        T, L = k.shape[2], self.length
        if L == 0:  # a prefill: buffers for these keys (the last ones, unless their shape or dtype differs)
            B, H, _, D = k.shape
            if self.k is None or self.k.shape != (B, H, self.capacity, D) or self.k.dtype != k.dtype \
                    or self.k.device != k.device or self.v.shape[3] != v.shape[3]:
                self.k = k.new_empty(B, H, self.capacity, D)
                self.v = v.new_empty(B, H, self.capacity, v.shape[3])
        elif T != 1:
            raise ValueError(f"LayerCache.append: k has {T} positions and the cache holds {L}; after the "
                             "prefill the cache takes one position per step")
        if L + T > self.capacity:
            raise ValueError(f"LayerCache.append: {L} cached + {T} new positions > capacity {self.capacity}")
        self.k[:, :, L:L + T].copy_(k)
        self.v[:, :, L:L + T].copy_(v)
        self.length = L + T
        return self.k[:, :, :L + T], self.v[:, :, :L + T]


class KVCache:
    """The keys and values of the positions a GPT has read, for each of its layers."""

    def __init__(self, n_layer, capacity):
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]
        self.capacity = capacity

    @property
    def length(self):
        """How many positions are cached."""
        return self.layers[0].length if self.layers else 0

    def clear(self):
        """Forgets every position (the buffers are kept for the next prefill)."""
        for layer in self.layers:
            layer.length = 0


def forward_cached(model, idx, cache):
    """The logits (B, vocab) of the token after idx (B, T), which follows the tokens whose keys and
    values the cache holds: the blocks read only idx, and idx's keys and values join the cache. The
    same computation as model(idx) over the whole context (the blocks run fused where they can, as
    there)."""
    t = model.transformer
    start = cache.length
    pos = torch.arange(start, start + idx.shape[1], dtype=torch.long, device=idx.device)
    x = t.drop(t.wte(idx) + t.wpe(pos))
    pending = None
    for block, layer in zip(t.h, cache.layers):
        x, pending = block(x, pending, layer)
    x = t.ln_f.add_norm(x[:, -1], None if pending is None else pending[:, -1])[1]
    return model.lm_head(x)


def next_token(logits, temperature, top_k):
    """Draws each row's next token (B, 1) from logits (B, vocab): the most likely one at temperature 0,
    else from softmax(logits / temperature) restricted to the top_k most likely."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return multinomial(F.softmax(logits, dim=-1))


def multinomial(probs, generator=None):
    """torch.multinomial(probs, 1, generator=generator): the same draws, and the generator left in the
    same state, for (B, V) probabilities; on the CPU a fraction of its time.

    torch's one-sample path (an exponential race: each entry's float32 exponential from a float64
    uniform, then the largest p / q) spends its time on the logarithm of every entry; torch.rand
    draws the same uniforms from the generator, and the C++ kernel (csrc/multinomial.h) takes the
    logarithm only of the entries that can win. The tokens a seed gives are thus torch's, as nanoGPT's
    sample.py draws them. Where torch would refuse the probabilities, torch.multinomial raises its own
    error (after the uniforms were drawn); where this torch draws otherwise than the kernel assumes
    (_draws_like_torch), torch.multinomial runs."""
    if (probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 2 or probs.stride(-1) != 1
            or probs.numel() == 0 or not _draws_like_torch()):
        return torch.multinomial(probs, 1, generator=generator)
    u = torch.rand(probs.shape, dtype=torch.float64, device="cpu", generator=generator)
    out = cpu.multinomial_from_uniform(probs, u)
    return torch.multinomial(probs, 1, generator=generator) if out is None else out


@functools.cache
def _draws_like_torch():
    """Whether the kernel's draws are this torch's: rows of a few distributions (flat, peaked, a few
    entries of unequal weight, where the exponentials' exact values decide) drawn both ways from two
    generators seeded alike, the draws and the generators' states compared. Once per process."""
    cpu_ = dict(device="cpu")
    logits = torch.randn(6, 700, generator=torch.Generator(**cpu_).manual_seed(0), **cpu_)
    logits *= torch.tensor([[0.1], [1.0], [4.0], [12.0], [0.0], [0.0]], **cpu_)
    logits[0, ::3] = float("-inf")
    logits[4:, 3:] = float("-inf")
    logits[4, :3] = torch.tensor([0.0, -0.5, -1.0], **cpu_)
    logits[5, :2] = torch.tensor([0.0, -1.5], **cpu_)
    probs = F.softmax(logits, dim=-1)
    ours, theirs = (torch.Generator(**cpu_).manual_seed(1) for _ in range(2))
    for _ in range(16):
        u = torch.rand(probs.shape, dtype=torch.float64, generator=ours, **cpu_)
        drawn = cpu.multinomial_from_uniform(probs, u)
        if drawn is None or not torch.equal(drawn, torch.multinomial(probs, 1, generator=theirs)):
            return False
    return torch.equal(ours.get_state(), theirs.get_state())


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
    """GPT.generate: idx (B, T) extended by max_new_tokens tokens. use_cache=False recomputes the whole
    context for every token (nanoGPT's loop); the same seed draws the same tokens either way."""
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"generate: idx must be (batch, T) token ids with at least one token to continue from "
                         f"(a start token), got shape {tuple(idx.shape)}")
    _check_sampling(idx, model.config.vocab_size, temperature, top_k)
    block_size = model.config.block_size
    cache = KVCache(model.config.n_layer, block_size) if use_cache else None
    for _ in range(max_new_tokens):
        if cache is None:
            context = idx if idx.size(1) <= block_size else idx[:, -block_size:]
            logits = model(context)[0][:, -1, :]
        elif 0 < cache.length < block_size:  # the cache holds every token but the last
            logits = forward_cached(model, idx[:, -1:], cache)
        else:  # the prompt, or a context cropped to block_size: a prefill
            cache.clear()
            logits = forward_cached(model, idx[:, -block_size:], cache)
        idx = torch.cat((idx, next_token(logits, temperature, top_k)), dim=1)
    return idx


def _check_sampling(idx, vocab_size, temperature, top_k):
    """generate's other arguments, each a ValueError naming it where the loop would fail deep inside
    (an empty top-k, an embedding index) or draw from NaN probabilities."""
    try:
        ok = top_k is None or (not isinstance(top_k, bool) and operator.index(top_k) >= 1)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"generate: top_k must be None (every token) or a positive int, got {top_k!r}")
    try:
        ok = math.isfinite(temperature) and temperature >= 0
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0: always the most likely token), "
                         f"got {temperature!r}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"generate: idx must hold integer token ids, got {idx.dtype}")
    low, high = (idx.min().item(), idx.max().item()) if idx.numel() else (0, 0)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"generate: idx holds token id {low if low < 0 else high}, outside the model's vocabulary "
                         f"[0, {vocab_size})")


def cast_weights_to_bfloat16(model):
    """Stores the weights of model's linear layers (lm_head included) in bfloat16, in place, and returns
    model: for sampling under torch.autocast("cpu", dtype=torch.bfloat16), which rounds each weight to
    bfloat16 before its product anyway. The products, and so the tokens, are autocast's over the float32
    weights, and each step reads half the bytes. Biases, LayerNorms and the embeddings stay float32 (the
    token embedding is no longer tied to lm_head). The result is for inference: its weights no longer
    train, and it runs only under bfloat16 autocast."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype != torch.bfloat16:
            module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
    return model
