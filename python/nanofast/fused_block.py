"""One transformer block as one autograd node: its forward and backward written out by hand, llm.c's way.

Autograd records about thirty nodes for a block of model.py's GPT (views, casts, the four linears,
the kernels, the residual adds, dropout), and on the CPU each costs microseconds of bookkeeping. Here
`_Block.forward` runs the block's matmuls (nanofast.nn.Linear's) and nanofast's C++ kernels in a row
(the CPU backend's launchers, nanofast/ops/cpu.py) and keeps what the backward needs;
`_Block.backward` walks the same steps back (`pytest --benchmark -k fused_block` measures the gain).
The arithmetic is the per-op block's:

* the same kernels and matmuls (nanofast.ops.linear's), and under bfloat16 autocast the same roundings
  (the matmuls' operands and outputs in bfloat16, the residual stream and the LayerNorm statistics in
  float32, weight gradients summed in float32; see ops/linear.py);
* the same dropout masks: the same seeds, drawn from torch's generator in the same order (attention's,
  then the attention projection's, then the MLP's), so a seeded run takes the same steps either way;
* the gradient of the qkv matmul's output is written by the attention kernel straight into one
  (N, 3C) buffer, where autograd would concatenate three.

Sampling runs the same forward with the layer's key/value cache (grad mode off: no node, nothing
kept), where a decode step's one-row products leave the Python around them a large share of the
step.

tests/test_fused_block.py checks the loss and every gradient against the per-op block. The model
decides when a block runs here (model.Block.can_run_fused) and hands over its parameters in the order
of model.Block.FUSED_PARAMETERS; this file knows nothing of the model's modules.

Dimensions: B batch, T time, C channels (n_embd), NH heads, HS head size, N = B*T rows.
"""
import math

import torch

from .ops import cpu
from .ops.formula import eager_apply
from .ops.seed import draw_seed

EPS = 1e-5  # model.py's LayerNorm epsilon
# GELU's derivative is kept from the forward (float32, one erf for both) up to this many elements, where
# it stays in the last-level cache; past it, writing and reading it back costs more than computing it
# again.
_KEEP_GELU_GRAD_MAX = 1 << 22


def compute_dtype(x):
    """The matmuls' dtype: autocast's where it is on (as for nn.Linear), else the stream's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def forward(x, pending, n_head, dropout_p, *parameters, cache=None):
    """(x + pending + attn(ln_1(x + pending)), mlp(ln_2(...))): model.Block.forward's result, for CPU
    tensors in eager mode. parameters: ln_1's weight and bias, attn.c_attn's, attn.c_proj's, ln_2's,
    mlp.c_fc's and mlp.c_proj's (each a weight, then a bias or None).

    cache (sampling, grad mode off: nanofast.generation.LayerCache): the keys and values of the
    positions before x's, which x's own join, as model.CausalSelfAttention takes it."""
    if cache is not None and torch.is_grad_enabled():
        raise RuntimeError("fused_block.forward: a key/value cache is for sampling, with grad mode off")
    # (with grad mode off, in evaluation, no autograd node: nothing is kept for a backward)
    return eager_apply(_Block, x, pending, n_head, dropout_p, compute_dtype(x), *parameters, cache)


def _dropout(x, p):
    """(nanofast.ops.dropout(x, p), its seed or None): the same seed drawn from torch's generator and
    the same kernel as the model's dropout modules; the backward reruns the kernel with the seed."""
    if p == 0.0:
        return x, None
    seed = draw_seed()
    return cpu.dropout(x, p, seed), seed


def _dropout_backward(d, p, seed):
    return d if seed is None else cpu.dropout(d, p, seed)


def _matmul_weights(cd, weights):
    """The linears' weights and biases as the block's matmuls take them: as they are where the products
    are the stream's dtype, or bfloat16 ones that nanofast's bfloat16 GEMM rounds while packing; else
    cast to bfloat16 once, autocast's casts."""
    if cd is not torch.bfloat16 or cpu.has_gemm_bf16():
        return weights
    return [None if t is None else t.to(cd) for t in weights]


def _heads(t, B, T, NH, HS):
    """q, k, v as (B, NH, T, HS) views of a (N, 3C) qkv tensor (split + view + transpose, in two ops)."""
    return t.view(B, T, 3, NH, HS).permute(2, 0, 3, 1, 4).unbind(0)


def _bias_grad(d, b):
    return None if b is None else d.sum(0).to(b.dtype)


class _Block(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, pending, n_head, p, cd, ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w,
                fc_b, mp_w, mp_b, cache=None):
        with torch.autocast("cpu", enabled=False):
            B, T, C = x.shape
            NH, HS, N = n_head, C // n_head, B * T
            W = _matmul_weights(cd, (attn_w, attn_b, proj_w, proj_b, fc_w, fc_b, mp_w, mp_b))
            attn_wc, attn_bc, proj_wc, proj_bc, fc_wc, fc_bc, mp_wc, mp_bc = W
            x = x.contiguous()
            # 1. x1 = x + pending (the previous block's MLP update) and h1 = ln_1(x1), in one pass
            if pending is None:
                x1 = x
                h1, mean1, rstd1 = cpu.layer_norm_forward(x.view(N, C), ln1_w, ln1_b, EPS)
                h1 = h1.to(cd)
            else:
                x1, h1, mean1, rstd1 = cpu.add_layer_norm_forward(x, pending.contiguous(), ln1_w, ln1_b, EPS, cd)
            h1 = h1.view(N, C)
            # 2. queries, keys and values of every head: one (N, 3C) matmul; q, k, v are views of it
            qkv = cpu.linear(h1, attn_wc, attn_bc, cd)
            q, k, v = _heads(qkv, B, T, NH, HS)
            causal = True
            if cache is not None:  # as model.CausalSelfAttention does with it
                k, v = cache.append(k, v)
                causal = T > 1
            # 3. causal attention; the output is (B, T, NH, HS) in memory, i.e. already (N, C) rows
            seed = draw_seed() if p > 0 else None
            scale = 1.0 / math.sqrt(HS)
            y, lse = cpu.attention_forward(q, k, v, causal, scale, p, seed)
            yc = y.transpose(1, 2).reshape(N, C)
            # 4. the heads mixed back into the stream: a = dropout(y @ Wproj^T)
            a, seed_a = _dropout(cpu.linear(yc, proj_wc, proj_bc, cd), p)
            # 5. x2 = x1 + a and h2 = ln_2(x2), in one pass
            x2, h2, mean2, rstd2 = cpu.add_layer_norm_forward(x1, a.view(B, T, C), ln2_w, ln2_b, EPS, cd)
            h2 = h2.view(N, C)
            # 6. the MLP: f = h2 @ Wfc^T, g = gelu(f), m = dropout(g @ Wmp^T); m is the next norm's residual
            f = cpu.linear(h2, fc_wc, fc_bc, cd)
            keep_gelu_grad = f.numel() <= _KEEP_GELU_GRAD_MAX and not cpu.torch_runs("gelu", f.dtype) and \
                any(ctx.needs_input_grad)  # (else no backward will run)
            if keep_gelu_grad:  # gelu'(f) kept instead of f: the backward is one multiply
                g, gelu_in = cpu.gelu_forward_saving_grad(f)
            else:
                g, gelu_in = cpu.gelu_forward(f), f
            m, seed_m = _dropout(cpu.linear(g, mp_wc, mp_bc, cd), p)
        ctx.save_for_backward(x, x1, h1, mean1, rstd1, qkv, y, lse, seed, seed_a, x2, h2, mean2, rstd2, gelu_in, g,
                              seed_m, ln1_w, ln2_w, *W)
        ctx.first = pending is None
        ctx.kept_gelu_grad = keep_gelu_grad
        ctx.pending_dtype = None if pending is None else pending.dtype
        ctx.meta = (B, T, C, NH, HS, p, scale, cd)
        ctx.biases = (ln1_b is not None, ln2_b is not None)
        return x2, m.view(B, T, C)

    @staticmethod
    def backward(ctx, dx2, dm):
        (x, x1, h1, mean1, rstd1, qkv, y, lse, seed, seed_a, x2, h2, mean2, rstd2, gelu_in, g, seed_m, ln1_w,
         ln2_w, attn_wc, attn_bc, proj_wc, proj_bc, fc_wc, fc_bc, mp_wc, mp_bc) = ctx.saved_tensors
        B, T, C, NH, HS, p, scale, cd = ctx.meta
        N = B * T
        need = ctx.needs_input_grad
        with torch.autocast("cpu", enabled=False):
            # 6. MLP: through m's dropout and the projection, GELU, then the widening matmul
            dm = _dropout_backward(dm.reshape(N, C), p, seed_m)
            d_mp_w = cpu.mm(dm.t(), g, dtype=cd, out_dtype=x.dtype) if need[15] else None
            d_mp_b = _bias_grad(dm, mp_bc) if need[16] else None
            dg = cpu.mm(dm, mp_wc, dtype=cd)
            if ctx.kept_gelu_grad:  # the derivative the forward kept (float32, or float64)
                df = cpu.gelu_backward_from_grad(dg, gelu_in)
            else:  # f itself: the derivative is computed again
                df = cpu.gelu_backward(dg, gelu_in)
            d_fc_w = cpu.mm(df.t(), h2, dtype=cd, out_dtype=x.dtype) if need[13] else None
            d_fc_b = _bias_grad(df, fc_bc) if need[14] else None
            dh2 = cpu.mm(df, fc_wc, dtype=cd)
            # 5. ln_2 and the residual add: x1's gradient is dx2 plus the norm's, a's the same in a's dtype
            dx1, da, d_ln2_w, d_ln2_b = cpu.add_layer_norm_backward(
                dh2.view(B, T, C), dx2, x2, ln2_w, mean2, rstd2, dh2.dtype, need[11], ctx.biases[1] and need[12])
            # 4. the attention projection (and its dropout)
            da = _dropout_backward(da.reshape(N, C), p, seed_a)
            d_proj_w = cpu.mm(da.t(), y.transpose(1, 2).reshape(N, C), dtype=cd, out_dtype=x.dtype) if need[9] else None
            d_proj_b = _bias_grad(da, proj_bc) if need[10] else None
            dy = cpu.mm(da, proj_wc, dtype=cd).view(B, T, NH, HS).transpose(1, 2)
            # 3. attention: dq, dk and dv land in their columns of the qkv gradient
            dqkv = torch.empty(N, 3 * C, dtype=qkv.dtype, device="cpu")
            cpu.attention_backward(dy, *_heads(qkv, B, T, NH, HS), y, lse, True, scale, p, seed,
                                   grads=_heads(dqkv, B, T, NH, HS))
            # 2. the qkv matmul
            d_attn_w = cpu.mm(dqkv.t(), h1, dtype=cd, out_dtype=x.dtype) if need[7] else None
            d_attn_b = _bias_grad(dqkv, attn_bc) if need[8] else None
            dh1 = cpu.mm(dqkv, attn_wc, dtype=cd)
            # 1. ln_1 and the residual add that fed it
            if ctx.first:
                dxn, d_ln1_w, d_ln1_b = cpu.layer_norm_backward(dh1.to(x.dtype), x.view(N, C), ln1_w, mean1, rstd1,
                                                                need[5], ctx.biases[0] and need[6])
                dx, dpending = dx1 + dxn.view(B, T, C), None
            else:
                dx, dpending, d_ln1_w, d_ln1_b = cpu.add_layer_norm_backward(
                    dh1.view(B, T, C), dx1, x1, ln1_w, mean1, rstd1, ctx.pending_dtype, need[5],
                    ctx.biases[0] and need[6])
        weights = (d_attn_w, d_attn_b, d_proj_w, d_proj_b, d_fc_w, d_fc_b, d_mp_w, d_mp_b)
        # the bias gradients come out in the matmuls' dtype; the parameters keep the stream's
        weights = tuple(None if d is None else d.to(x.dtype) for d in weights)
        return (dx, dpending, None, None, None, d_ln1_w, d_ln1_b, *weights[:4], d_ln2_w, d_ln2_b, *weights[4:], None)
