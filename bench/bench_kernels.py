"""Kernel benchmarks: LayerNorm, attention and the other ops, forward and forward+backward, float32 and bfloat16, at
nanoGPT's CPU-config and GPU-config shapes plus sweeps, against torch eager, torch.compile and a naive
implementation, on the CPU and (where present) CUDA. Run with `pytest --benchmark`.

Every case first checks its provider against a float64 reference (the flash-attention rule), so a
fast wrong kernel fails instead of posting a number.
"""
import pytest
import torch
import torch.nn.functional as F

import nanofast
from nanofast.ops import cpu
from nanofast.testing import ATOL_TRITON_GPU, assert_parity, attention_reference

from conftest import timed
from providers import ATTENTION, LAYER_NORM, attention_flops, layer_norm_bytes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

ATTN_CONFIGS = {"cpu-config": (12, 4, 64, 32), "gpu-config": (64, 6, 256, 64)}
ATTN_SWEEP = [(4, 6, T, 64) for T in (64, 128, 256, 512, 1024)]
LN_CONFIGS = {"cpu-config": (768, 128), "gpu-config": (16384, 384)}
LN_SWEEP = [(4096, C) for C in (128, 256, 384, 768, 1024, 2048, 4096)]
LN_NAMES = ("y", "dx", "dweight", "dbias")


def _cases(configs, sweep, axis):
    cases = []
    for dev in DEVICES:
        for name, shape in configs.items():
            for mode in ("fwd", "fwdbwd"):
                for dtype in (torch.float32, torch.bfloat16):
                    for prov in ("nanofast", "torch", "compile", "naive"):
                        if prov == "compile" and dtype != torch.float32:
                            continue  # compile times add up: float32 only
                        cases.append(pytest.param(dev, name, shape, mode, dtype, prov,
                                                  id=f"{dev}-{name}-{mode}-{str(dtype)[6:]}-{prov}"))
        for shape in sweep:
            label = f"sweep:{axis}={shape[2] if axis == 'T' else shape[1]}"
            for prov in ("nanofast", "torch", "naive"):
                cases.append(pytest.param(dev, label, shape, "fwdbwd", torch.float32, prov,
                                          id=f"{dev}-{label}-{prov}"))
    return cases


def _run(fn, inputs, grad_out, backward, kwargs):
    out = fn(*inputs, **kwargs)
    if not backward:
        return [out]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [out] + list(torch.autograd.grad(out, leaves, grad_out))


def _assert_parity_all(op, names, ours, theirs, ref):
    """The parity rule (nanofast.testing) for each tensor of a result: names[i] labels the i-th. On
    CUDA nanofast's ops run the Triton kernels, which keep their GPU slack."""
    assert len(ours) == len(theirs) == len(ref) and len(ours) <= len(names), (op, len(ours), names)
    atol = ATOL_TRITON_GPU if ours[0].is_cuda else None
    for name, o, t, r in zip(names, ours, theirs, ref):
        assert_parity(f"{op} {name}", o, t, r, atol)


def _check_parity(op, names, fn, ref_fn, inputs, grad_out, backward, kwargs):
    """fn against ref_fn (torch, in the same dtype) and ref_fn in float64, on the same inputs: the
    output, and with backward the gradient of each input that requires one."""
    ours = _run(fn, inputs, grad_out, backward, kwargs)
    theirs = _run(ref_fn, inputs, grad_out, backward, kwargs)
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                for t in inputs]
    ref = _run(ref_fn, inputs64, grad_out.double(), backward, kwargs)
    _assert_parity_all(op, names, ours, theirs, ref)


@pytest.mark.parametrize("device,case,shape,mode,dtype,provider", _cases(ATTN_CONFIGS, ATTN_SWEEP, "T"))
def test_attention(benchmark, record, device, case, shape, mode, dtype, provider):
    B, H, T, D = shape
    g = torch.Generator().manual_seed(0)
    # nanoGPT's layout: (B, T, H, D) memory viewed as (B, H, T, D).
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2).requires_grad_()
               for _ in range(3))
    dout = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    backward = mode == "fwdbwd"
    fn = ATTENTION[provider]
    kwargs = {"is_causal": True}
    small = B * H * T <= 4096
    names = ("out", "dq", "dk", "dv")
    if provider != "torch" and (small or device == "cuda"):
        _check_parity("attention", names, fn, attention_reference if device == "cpu" else F.scaled_dot_product_attention,
                      [q, k, v], dout, backward, kwargs)
    elif provider != "torch":  # big shapes: check one head's slice against float64, cheaply
        sl = [t[:1, :1].detach().requires_grad_() for t in (q, k, v)]
        _check_parity("attention", names, fn, attention_reference, sl, dout[:1, :1], backward, kwargs)
    timed(benchmark, lambda: _run(fn, [q, k, v], dout, backward, kwargs), device)
    record(benchmark, op="attention", case=case if case.startswith("sweep") else f"{case} B{B} H{H} T{T} D{D}",
           mode=mode, dtype=dtype, provider=provider, device=device,
           work=attention_flops(B, H, T, D, True, backward), unit="GFLOP/s")


# The attention calls of Hugging Face models (issue 17's families: B=8, T=128, 256 wide; SmolLM2-135M at
# B=4, T=512): (B, H, Hkv, T, D, padding, causal, window). Both sides get what transformers passes on the
# CPU: with padding or a window one (B, 1, T, T) bool mask holding every rule (causal included, is_causal
# off), else is_causal; grouped key/value heads with enable_gqa.
ATTN_MASK_CONFIGS = {
    "bert-padding": (8, 8, 8, 128, 32, True, False, None),
    "qwen2-gqa": (8, 8, 2, 128, 32, False, True, None),
    "qwen2-gqa-padding": (8, 8, 2, 128, 32, True, True, None),
    "smollm2-gqa": (4, 9, 3, 512, 64, False, True, None),
    "mistral-window-as-mask": (4, 8, 2, 512, 32, False, True, 128),
}


def _hf_mask(B, T, padding, causal, window, g):
    """The bool mask transformers builds, or None where it passes is_causal instead."""
    if not (padding or window):
        return None
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g) if padding else torch.full((B,), T)
    keep = (torch.arange(T) < lengths[:, None]).view(B, 1, 1, T)
    ones = torch.ones(T, T, dtype=torch.bool)
    if causal:
        keep = keep & ones.tril()
    if window:
        keep = keep & ones.triu(1 - window)
    return keep.expand(B, 1, T, T).contiguous()


@pytest.mark.parametrize("case", list(ATTN_MASK_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("provider", ["nanofast", "torch"])
def test_attention_masks(benchmark, record, case, dtype, provider):
    """Attention forward and backward with a padding mask, grouped-query heads and a sliding window passed
    as a mask, on the CPU, against torch's F.scaled_dot_product_attention on the same arguments."""
    B, H, Hkv, T, D, padding, causal, window = ATTN_MASK_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, T, Hkv, D, generator=g).to(dtype).transpose(1, 2).requires_grad_() for _ in range(2))
    dout = torch.randn(B, H, T, D, generator=g).to(dtype)
    mask = _hf_mask(B, T, padding, causal, window, g)
    kwargs = dict(attn_mask=mask, is_causal=causal and mask is None, enable_gqa=Hkv != H)
    fn = ATTENTION[provider]
    if provider != "torch":  # one key/value head and its query heads of the first sequence, against float64
        G = H // Hkv
        sl = [t[:1, :n].detach().requires_grad_() for t, n in ((q, G), (k, 1), (v, 1))]
        sl_kwargs = dict(kwargs, attn_mask=None if mask is None else mask[:1])
        _check_parity("masked attention", ("out", "dq", "dk", "dv"), fn, attention_reference, sl, dout[:1, :G], True,
                      sl_kwargs)
    timed(benchmark, lambda: _run(fn, [q, k, v], dout, True, kwargs), "cpu")
    record(benchmark, op="attention (HF masks, GQA)", case=f"{case} B{B} H{H}/{Hkv} T{T} D{D}", mode="fwdbwd",
           dtype=dtype, provider=provider, device="cpu", work=attention_flops(B, H, T, D, causal, True),
           unit="GFLOP/s")


# Sequence lengths just past a block of the CPU kernel's (64 positions): (B, H, T, D, causal). ViT's
# 64 patches and a class token (the families' 32-pixel images, patch 4) and ViT-B/16's 197 at 224 pixels,
# without a causal mask; and the parity rule's odd lengths, causal.
ATTN_ODD_CONFIGS = {"vit-32px": (8, 8, 65, 32, False), "vit-b16-224": (2, 12, 197, 64, False),
                    "causal-T97": (8, 8, 97, 32, True), "causal-T257": (2, 12, 257, 64, True)}


@pytest.mark.parametrize("case", list(ATTN_ODD_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("provider", ["nanofast", "torch"])
def test_attention_odd_lengths(benchmark, record, case, dtype, provider):
    """Attention forward and backward on the CPU at lengths that are not a multiple of the kernel's
    blocks, where the last block holds a few positions."""
    B, H, T, D, causal = ATTN_ODD_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2).requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, T, D, generator=g).to(dtype)
    fn = ATTENTION[provider]
    kwargs = {"is_causal": causal}
    if provider != "torch":  # one head of the first sequence against float64
        sl = [t[:1, :1].detach().requires_grad_() for t in (q, k, v)]
        _check_parity("attention", ("out", "dq", "dk", "dv"), fn, attention_reference, sl, dout[:1, :1], True, kwargs)
    timed(benchmark, lambda: _run(fn, [q, k, v], dout, True, kwargs), "cpu")
    record(benchmark, op="attention (odd lengths)", case=f"{case} B{B} H{H} T{T} D{D}", mode="fwdbwd", dtype=dtype,
           provider=provider, device="cpu", work=attention_flops(B, H, T, D, causal, True), unit="GFLOP/s")


@pytest.mark.parametrize("device,case,shape,mode,dtype,provider",
                         _cases(LN_CONFIGS, LN_SWEEP, "C"))
def test_layer_norm(benchmark, record, device, case, shape, mode, dtype, provider):
    N, C = shape[:2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(C, generator=g).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(C, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(N, C, generator=g).to(device=device, dtype=dtype)
    backward = mode == "fwdbwd"
    fn = LAYER_NORM[provider]
    if provider != "torch":
        rows = slice(0, min(N, 512))
        sl = [x[rows].detach().requires_grad_(), w, b]
        _check_parity("layer_norm", LN_NAMES, lambda x, w, b: fn(x, (C,), w, b),
                      lambda x, w, b: F.layer_norm(x, (C,), w, b), sl, dy[rows], backward, {})
    timed(benchmark, lambda: _run(lambda x, w, b: fn(x, (C,), w, b), [x, w, b], dy, backward, {}), device)
    record(benchmark, op="layer_norm", case=case if case.startswith("sweep") else f"{case} {N}x{C}", mode=mode,
           dtype=dtype, provider=provider, device=device,
           work=layer_norm_bytes(N, C, x.element_size(), backward), unit="GB/s")


def _ln_kernels_nanofast(x, w, b, dy):
    y, mean, rstd = cpu.layer_norm_forward(x, w, b, 1e-5)
    return (y,) + cpu.layer_norm_backward(dy, x, w, mean, rstd, True, True)


def _ln_kernels_torch(x, w, b, dy):
    C = x.shape[1]
    y, mean, rstd = torch.ops.aten.native_layer_norm(x, [C], w, b, 1e-5)
    return (y,) + torch.ops.aten.native_layer_norm_backward(dy, x, [C], mean, rstd, w, b, [True, True, True])


LN_KERNELS = {"nanofast": _ln_kernels_nanofast, "torch": _ln_kernels_torch}


@pytest.mark.parametrize("case", list(LN_CONFIGS))
@pytest.mark.parametrize("provider", list(LN_KERNELS))
def test_layer_norm_kernels(benchmark, record, case, provider):
    """LayerNorm's forward and backward kernels called directly, float32 on the CPU, without autograd:
    nanofast's launchers (nanofast.ops.cpu) against the ATen ops behind F.layer_norm
    (native_layer_norm and its backward). Each side allocates its outputs, as in the op. Without a
    Python autograd.Function and its node in the backward graph, this row shows what the kernels
    themselves gain at small shapes."""
    N, C = LN_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    x, w, b, dy = (torch.randn(*s, generator=g) for s in ((N, C), (C,), (C,), (N, C)))
    fn = LN_KERNELS[provider]
    if provider != "torch":
        rows = slice(0, min(N, 512))
        ours, theirs = fn(x[rows], w, b, dy[rows]), _ln_kernels_torch(x[rows], w, b, dy[rows])
        ref = _ln_kernels_torch(x[rows].double(), w.double(), b.double(), dy[rows].double())
        _assert_parity_all("layer_norm kernels", LN_NAMES, ours, theirs, ref)
    timed(benchmark, lambda: fn(x, w, b, dy), "cpu")
    record(benchmark, op="layer_norm kernels", case=f"{case} {N}x{C}", mode="fwdbwd", dtype=torch.float32,
           provider=provider, device="cpu", work=layer_norm_bytes(N, C, 4, True), unit="GB/s")


def _unfused_add_layer_norm(x, r, shape, w, b, eps, out_dtype):
    h = x + r
    return h, F.layer_norm(h, shape, w, b, eps).to(out_dtype)


ADD_LAYER_NORM = {"nanofast": nanofast.ops.add_layer_norm, "torch": _unfused_add_layer_norm}
# the stream's dtype, the residual's and the output's: float32 throughout, and bfloat16 autocast
# (a bf16 layer output added to the fp32 stream, the norm handed on in bf16)
ADD_LN_DTYPES = {"float32": (torch.float32,) * 3, "autocast-bf16": (torch.float32, torch.bfloat16, torch.bfloat16)}


def _add_ln_fwdbwd(fn, x, r, w, b, dh, dy, out_dtype):
    h, y = fn(x, r, (x.shape[-1],), w, b, 1e-5, out_dtype)
    return [h, y] + list(torch.autograd.grad([h, y], [x, r, w, b], [dh, dy]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(LN_CONFIGS))
@pytest.mark.parametrize("dtypes", list(ADD_LN_DTYPES))
@pytest.mark.parametrize("provider", list(ADD_LAYER_NORM))
def test_add_layer_norm(benchmark, record, device, case, dtypes, provider):
    """The fused residual add + LayerNorm (a transformer block's x + f(...) and the norm after it),
    forward and backward, against torch's add, F.layer_norm and the cast."""
    N, C = LN_CONFIGS[case]
    xd, rd, yd = ADD_LN_DTYPES[dtypes]
    g = torch.Generator().manual_seed(0)
    make = lambda dt, *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dt)  # noqa: E731
    x, r, w, b = (make(xd, N, C), make(rd, N, C), make(xd, C), make(xd, C))
    for t in (x, r, w, b):
        t.requires_grad_()
    dh, dy = make(xd, N, C), make(yd, N, C)
    fn = ADD_LAYER_NORM[provider]
    if provider != "torch":  # parity on the first rows, against float64
        rows = slice(0, min(N, 512))
        sl = [x[rows].detach().requires_grad_(), r[rows].detach().requires_grad_(), w, b, dh[rows], dy[rows]]
        ours = _add_ln_fwdbwd(fn, *sl, yd)
        theirs = _add_ln_fwdbwd(_unfused_add_layer_norm, *sl, yd)
        ref = _add_ln_fwdbwd(_unfused_add_layer_norm, *[t.detach().double().requires_grad_(t.requires_grad)
                                                        for t in sl], torch.float64)
        _assert_parity_all("add_layer_norm", ("h", "y", "dx", "dresidual", "dweight", "dbias"), ours, theirs, ref)
    timed(benchmark, lambda: _add_ln_fwdbwd(fn, x, r, w, b, dh, dy, yd), device)
    # compulsory traffic: forward reads x, r, writes h, y; backward reads dy, dh, h, writes dx, dr
    xs, rs, ys = x.element_size(), r.element_size(), dy.element_size()
    record(benchmark, op="add + layer_norm", case=f"{case} {N}x{C}", mode="fwdbwd", dtype=dtypes,
           provider=provider, device=device, work=N * C * (5 * xs + 2 * rs + 2 * ys), unit="GB/s")


# RMSNorm rows: nanoGPT's configs, and a SmolLM2-135M fine-tuning step's (B=4, T=512, C=576)
RMS_NORM_CONFIGS = {"cpu-config": (768, 128), "gpu-config": (16384, 384), "smollm2": (2048, 576)}


def _llama_rms_norm(x, w, eps=1e-6):
    """Hugging Face's LlamaRMSNorm.forward, torch's composed equivalent."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


RMS_NORM = {"nanofast": lambda x, w: nanofast.ops.rms_norm(x, x.shape[-1:], w, 1e-6, cast_before_weight=True),
            "torch": _llama_rms_norm}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(RMS_NORM_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("provider", list(RMS_NORM))
def test_rms_norm(benchmark, record, device, case, dtype, provider):
    """RMSNorm forward and backward as Llama, Qwen2 and Mistral compute it (the statistic in float32, the
    normalised rows cast back before the weight), against Hugging Face's module's torch code."""
    N, C = RMS_NORM_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(C, generator=g) * 0.1 + 1).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(N, C, generator=g).to(device=device, dtype=dtype)
    fn = RMS_NORM[provider]
    if provider != "torch":
        rows = slice(0, min(N, 512))
        _check_parity("rms_norm", ("y", "dx", "dweight"), fn, _llama_rms_norm, [x[rows].detach().requires_grad_(), w],
                      dy[rows], True, {})
    timed(benchmark, lambda: _run(fn, [x, w], dy, True, {}), device)
    # compulsory traffic: forward reads x, writes y; backward reads x and dy, writes dx
    record(benchmark, op="rms_norm", case=f"{case} {N}x{C}", mode="fwdbwd", dtype=dtype, provider=provider,
           device=device, work=5 * N * C * x.element_size(), unit="GB/s")


def _unfused_add_rms_norm(x, r, w, out_dtype):
    h = x + r
    return h, _llama_rms_norm(h, w).to(out_dtype)


ADD_RMS_NORM = {"nanofast": lambda x, r, w, out_dtype: nanofast.ops.add_rms_norm(
    x, r, x.shape[-1:], w, 1e-6, out_dtype, cast_before_weight=True), "torch": _unfused_add_rms_norm}


def _add_rms_fwdbwd(fn, x, r, w, dh, dy, out_dtype):
    h, y = fn(x, r, w, out_dtype)
    return [h, y] + list(torch.autograd.grad([h, y], [x, r, w], [dh, dy]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(RMS_NORM_CONFIGS))
@pytest.mark.parametrize("dtypes", list(ADD_LN_DTYPES))
@pytest.mark.parametrize("provider", list(ADD_RMS_NORM))
def test_add_rms_norm(benchmark, record, device, case, dtypes, provider):
    """A Llama decoder layer's residual add and the RMSNorm after it, forward and backward, against
    torch's add and Hugging Face's LlamaRMSNorm code."""
    N, C = RMS_NORM_CONFIGS[case]
    xd, rd, yd = ADD_LN_DTYPES[dtypes]
    g = torch.Generator().manual_seed(0)
    make = lambda dt, *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dt)  # noqa: E731
    x, r, w = make(xd, N, C), make(rd, N, C), make(xd, C)
    for t in (x, r, w):
        t.requires_grad_()
    dh, dy = make(xd, N, C), make(yd, N, C)
    fn = ADD_RMS_NORM[provider]
    if provider != "torch":
        rows = slice(0, min(N, 512))
        sl = [x[rows].detach().requires_grad_(), r[rows].detach().requires_grad_(), w, dh[rows], dy[rows]]
        ours = _add_rms_fwdbwd(fn, *sl, yd)
        theirs = _add_rms_fwdbwd(_unfused_add_rms_norm, *sl, yd)
        ref = _add_rms_fwdbwd(_unfused_add_rms_norm, *[t.detach().double().requires_grad_(t.requires_grad)
                                                       for t in sl], torch.float64)
        _assert_parity_all("add_rms_norm", ("h", "y", "dx", "dresidual", "dweight"), ours, theirs, ref)
    timed(benchmark, lambda: _add_rms_fwdbwd(fn, x, r, w, dh, dy, yd), device)
    xs, rs, ys = x.element_size(), r.element_size(), dy.element_size()
    record(benchmark, op="add + rms_norm", case=f"{case} {N}x{C}", mode="fwdbwd", dtype=dtypes, provider=provider,
           device=device, work=N * C * (5 * xs + 2 * rs + 2 * ys), unit="GB/s")


GELU_CONFIGS = {"cpu-config": (768, 512), "gpu-config": (16384, 1536)}  # the MLP's hidden activations
GELU = {"nanofast": nanofast.ops.gelu, "torch": F.gelu}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(GELU_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("provider", list(GELU))
def test_gelu(benchmark, record, device, case, dtype, provider):
    """Exact (erf) GELU forward and backward on the MLP's hidden activations (the GPT's 4C width)."""
    N, C = GELU_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, C, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(N, C, generator=g).to(device=device, dtype=dtype)
    fn = GELU[provider]
    if provider != "torch":
        rows = slice(0, min(N, 256))
        _check_parity("gelu", ("y", "dx"), fn, F.gelu, [x[rows].detach().requires_grad_()], dy[rows], True, {})
    timed(benchmark, lambda: _run(fn, [x], dy, True, {}), device)
    # compulsory traffic: forward reads x, writes y; backward reads x and dy, writes dx
    record(benchmark, op="gelu", case=f"{case} {N}x{C}", mode="fwdbwd", dtype=dtype, provider=provider,
           device=device, work=5 * N * C * x.element_size(), unit="GB/s")


GELU_TANH = {"nanofast": lambda x: nanofast.ops.gelu(x, approximate="tanh"),
             "torch": lambda x: F.gelu(x, approximate="tanh")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(GELU_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("provider", list(GELU_TANH))
def test_gelu_tanh(benchmark, record, device, case, dtype, provider):
    """GELU's tanh approximation (GPT-2's "gelu_new") forward and backward on the MLP's hidden
    activations."""
    N, C = GELU_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, C, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(N, C, generator=g).to(device=device, dtype=dtype)
    fn = GELU_TANH[provider]
    if provider != "torch":
        rows = slice(0, min(N, 256))
        _check_parity("gelu tanh", ("y", "dx"), fn, GELU_TANH["torch"], [x[rows].detach().requires_grad_()], dy[rows],
                      True, {})
    timed(benchmark, lambda: _run(fn, [x], dy, True, {}), device)
    record(benchmark, op="gelu tanh", case=f"{case} {N}x{C}", mode="fwdbwd", dtype=dtype, provider=provider,
           device=device, work=5 * N * C * x.element_size(), unit="GB/s")


# the gated MLP's hidden activations: nanoGPT's 4C widths, and a SmolLM2-135M step's (2048 rows of 1536)
GLU_CONFIGS = {"cpu-config": (768, 512), "gpu-config": (16384, 1536), "smollm2": (2048, 1536)}
GLUS = {
    "swiglu": {"nanofast": nanofast.ops.swiglu, "torch": lambda g, u: F.silu(g) * u},
    "geglu tanh": {"nanofast": lambda g, u: nanofast.ops.geglu(g, u, approximate="tanh"),
                   "torch": lambda g, u: F.gelu(g, approximate="tanh") * u},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(GLU_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("op", list(GLUS))
@pytest.mark.parametrize("provider", ["nanofast", "torch"])
def test_glu(benchmark, record, device, case, dtype, op, provider):
    """A gated MLP's act(gate) * up forward and backward (the two halves of one gate_up projection, read
    in place), against torch's activation and product."""
    N, C = GLU_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2 * C, generator=g).to(device=device, dtype=dtype)
    gate, up = (t.requires_grad_() for t in x.chunk(2, dim=-1))
    dy = torch.randn(N, C, generator=g).to(device=device, dtype=dtype)
    fn = GLUS[op][provider]
    if provider != "torch":
        rows = slice(0, min(N, 256))
        _check_parity(op, ("y", "dgate", "dup"), fn, GLUS[op]["torch"],
                      [gate[rows].detach().requires_grad_(), up[rows].detach().requires_grad_()], dy[rows], True, {})
    timed(benchmark, lambda: _run(fn, [gate, up], dy, True, {}), device)
    # compulsory traffic: forward reads gate and up, writes y; backward reads gate, up and dy, writes two
    record(benchmark, op=op, case=f"{case} {N}x{C}", mode="fwdbwd", dtype=dtype, provider=provider, device=device,
           work=8 * N * C * x.element_size(), unit="GB/s")


# B, H, H of k and v, T, D: nanoGPT's configs with a Llama-style rotary embedding, and a SmolLM2-135M
# fine-tuning step's attention (9 heads, 3 key/value heads)
ROPE_CONFIGS = {"cpu-config": (12, 4, 4, 64, 32), "gpu-config": (64, 6, 6, 256, 64), "smollm2": (4, 9, 3, 512, 64)}


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)


def _hf_apply_rotary_pos_emb(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb (unsqueeze_dim=1), torch's composed equivalent."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


ROPE = {"nanofast": nanofast.ops.apply_rotary_pos_emb, "torch": _hf_apply_rotary_pos_emb}


def _rope_fwdbwd(fn, q, k, cos, sin, dq, dk):
    qe, ke = fn(q, k, cos, sin)
    return [qe, ke] + list(torch.autograd.grad([qe, ke], [q, k], [dq, dk]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(ROPE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("provider", list(ROPE))
def test_rotary(benchmark, record, device, case, dtype, provider):
    """The rotary position embedding of q and k (Llama's rotate_half), forward and backward, on the
    projections' (B, T, H, D) memory viewed as (B, H, T, D), against Hugging Face's torch code."""
    B, H, Hk, T, D = ROPE_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hk, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    angles = torch.arange(T)[:, None] * (1e4 ** (-torch.arange(0, D, 2) / D))
    emb = torch.cat((angles, angles), dim=-1).expand(B, T, D)
    cos, sin = emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)
    dq, dk = torch.randn(q.shape, generator=g).to(device, dtype), torch.randn(k.shape, generator=g).to(device, dtype)
    fn = ROPE[provider]
    if provider != "torch":
        sl = [q[:1].detach().requires_grad_(), k[:1].detach().requires_grad_(), cos[:1], sin[:1], dq[:1], dk[:1]]
        ours = _rope_fwdbwd(fn, *sl)
        theirs = _rope_fwdbwd(_hf_apply_rotary_pos_emb, *sl)
        ref = _rope_fwdbwd(_hf_apply_rotary_pos_emb, *[t.detach().double().requires_grad_(t.requires_grad)
                                                       for t in sl])
        _assert_parity_all("rotary", ("q_embed", "k_embed", "dq", "dk"), ours, theirs, ref)
    timed(benchmark, lambda: _rope_fwdbwd(fn, q, k, cos, sin, dq, dk), device)
    # compulsory traffic: forward reads q and k, writes their rotations; backward the same on the gradients
    record(benchmark, op="rotary q,k", case=f"{case} B{B} H{H}/{Hk} T{T} D{D}", mode="fwdbwd", dtype=dtype,
           provider=provider, device=device, work=4 * (q.numel() + k.numel()) * q.element_size(), unit="GB/s")


LINEAR_CONFIGS = {"cpu-config": (768, 128, 512), "gpu-config": (16384, 384, 1536)}  # the MLP's c_fc: N, in, out
LINEAR = {"nanofast": nanofast.ops.linear, "torch": F.linear}


def _autocast_bf16(fn):
    def run(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # (float64 operands are left alone: the reference)
            return fn(*args)
    return run


@pytest.mark.parametrize("case", list(LINEAR_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("provider", list(LINEAR))
def test_linear(benchmark, record, case, dtype, provider):
    """nn.Linear's three products (y = x W^T, dx = dy W, dW = dy^T x) at the MLP's widening layer, on
    float32 x and W: in float32, nanofast's AVX-512 GEMM against torch's (MKL, which runs AVX2 code on
    AMD CPUs); under bfloat16 autocast, nanofast's AVX512-BF16 GEMM (rounding x and W while packing)
    against autocast's casts and torch's bfloat16 matmul (oneDNN). CPU only: on CUDA
    nanofast.ops.linear is torch's."""
    N, K, M = LINEAR_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, K, generator=g).requires_grad_()
    w = (torch.randn(M, K, generator=g) / K ** 0.5).requires_grad_()
    dy = torch.randn(N, M, generator=g).to(dtype)
    fn, ref_fn = LINEAR[provider], F.linear
    if dtype == torch.bfloat16:
        fn, ref_fn = _autocast_bf16(fn), _autocast_bf16(ref_fn)
    if provider != "torch":
        _check_parity("linear", ("y", "dx", "dweight"), fn, ref_fn, [x[:256].detach().requires_grad_(), w], dy[:256],
                      True, {})
    timed(benchmark, lambda: _run(fn, [x, w], dy, True, {}), "cpu")
    record(benchmark, op="linear", case=f"{case} {N}x{K}->{M}", mode="fwdbwd", dtype=dtype,
           provider=provider, device="cpu", work=6 * N * K * M, unit="GFLOP/s")


# (rows, in, classes): nanoGPT's CPU and GPU configs (shakespeare_char's 65 characters) and a GPT-2-shaped
# head (its vocabulary, 768 wide) at a small batch: B * T = 1024
CROSS_ENTROPY_CONFIGS = {"cpu-config": (768, 128, 65), "gpu-config": (16384, 384, 65), "gpt2-vocab": (1024, 768, 50304)}
CROSS_ENTROPY = {"nanofast": nanofast.ops.linear_cross_entropy,
                 "torch": lambda x, w, t: F.cross_entropy(F.linear(x, w), t)}

# One forward+backward in a fresh interpreter: a small call first (which loads the code paths), then
# the peak resident set size reset (/proc/self/clear_refs), then the measured call. Prints the growth
# of the peak over the resident size before that call, in bytes.
_PEAK_RSS_OF_ONE_CALL = r"""
import contextlib, sys
import torch, torch.nn.functional as F
import nanofast
provider, N, C, V, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
fn = nanofast.ops.linear_cross_entropy if provider == "nanofast" else lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
ctx = contextlib.nullcontext if dtype == "float32" else lambda: torch.autocast("cpu", dtype=torch.bfloat16)
def kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
def call(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, generator=g).requires_grad_()
    w = (torch.randn(V, C, generator=g) / C ** 0.5).requires_grad_()
    t = torch.randint(V, (n,), generator=g)
    def run():
        with ctx():
            loss = fn(x, w, t)
        return torch.autograd.grad(loss, (x, w))
    return run
call(64)()
run = call(N)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kib("VmRSS")
grads = run()
print((kib("VmHWM") - base) * 1024)
"""


def _peak_rss_growth(provider, N, C, V, dtype):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_ONE_CALL, provider, str(N), str(C), str(V),
                        "float32" if dtype == torch.float32 else "bfloat16"], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CROSS_ENTROPY_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("provider", list(CROSS_ENTROPY))
def test_cross_entropy(benchmark, record, case, dtype, provider):
    """A language model's head and loss, forward and backward (x's and W's gradients): nanofast's fused
    linear + cross-entropy, a chunk of rows at a time with the logits never stored whole, against
    torch's F.linear then F.cross_entropy, on float32 x and W, in float32 and under bfloat16 autocast.
    Rate: the three products' FLOPs. Peak memory: the growth of the peak resident set size over one
    call in a fresh process (after a small call that loads the code paths), with glibc's default
    malloc; it includes the gradients returned (x's and W's), alike on both sides."""
    N, C, V = CROSS_ENTROPY_CONFIGS[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).requires_grad_()
    w = (torch.randn(V, C, generator=g) / C ** 0.5).requires_grad_()
    t = torch.randint(V, (N,), generator=g)
    fn, ref_fn = CROSS_ENTROPY[provider], CROSS_ENTROPY["torch"]
    if dtype == torch.bfloat16:
        fn, ref_fn = _autocast_bf16(fn), _autocast_bf16(ref_fn)
    dloss = torch.tensor(1.0)
    if provider != "torch":
        rows = slice(0, 256)
        _check_parity("linear_cross_entropy", ("loss", "dx", "dweight"), lambda x, w: fn(x, w, t[rows]),
                      lambda x, w: ref_fn(x, w, t[rows]), [x[rows].detach().requires_grad_(), w], dloss, True, {})
    timed(benchmark, lambda: _run(lambda x, w: fn(x, w, t), [x, w], dloss, True, {}), "cpu")
    record(benchmark, op="linear + cross-entropy", case=f"{case} {N}x{C} -> {V}", mode="fwdbwd", dtype=dtype,
           provider=provider, device="cpu", work=6 * N * C * V, unit="GFLOP/s",
           peak_bytes=_peak_rss_growth(provider, N, C, V, dtype))


DROPOUT = {"nanofast": nanofast.ops.dropout, "torch": lambda x, p: F.dropout(x, p, True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("provider", list(DROPOUT))
def test_dropout(benchmark, record, dtype, provider):
    """Dropout p = 0.2 forward and backward on the residual stream at nanoGPT's GPU config (16384 x 384:
    13 of them a step). nanofast's masks come from a seeded counter-based generator on all threads,
    torch's from its sequential one, so the masks differ; each is checked for its keep rate and for
    a backward that applies the forward's mask."""
    N, C = 16384, 384
    x = torch.randn(N, C, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    dy = torch.ones(N, C, dtype=dtype)
    fn = DROPOUT[provider]
    y, dx = _run(lambda t: fn(t, 0.2), [x], dy, True, {})
    assert abs((y != 0).float().mean().item() - 0.8) < 0.01 and torch.equal(dx != 0, y != 0)
    timed(benchmark, lambda: _run(lambda t: fn(t, 0.2), [x], dy, True, {}), "cpu")
    # compulsory traffic: forward reads x, writes y; backward reads dy, writes dx
    record(benchmark, op="dropout p=0.2", case=f"gpu-config {N}x{C}", mode="fwdbwd", dtype=dtype,
           provider=provider, device="cpu", work=4 * N * C * x.element_size(), unit="GB/s")


@pytest.mark.parametrize("device", DEVICES)
def test_memory_bandwidth(benchmark, record, device):
    """The machine's copy bandwidth (bytes read + written), for reading the LayerNorm GB/s: a 512 MiB
    buffer copied, far beyond the caches. Both buffers are written first: untouched pages all map the
    kernel's one zero page, which reads at cache speed."""
    src = torch.ones(128 * 2**20, device=device)
    dst = torch.zeros_like(src)
    timed(benchmark, lambda: dst.copy_(src), device)
    record(benchmark, op="memcpy", case="512 MiB", mode="copy", dtype=torch.float32, provider="torch", device=device,
           work=2 * src.numel() * 4, unit="GB/s")


def _block_step(ln, attn, x, params, dy, H):
    """One transformer block's attention half, forward and backward: torch matmuls between our ops, the
    way training interleaves them (two OpenMP pools fighting over two cores would show here)."""
    w_ln, b_ln, w_qkv, w_proj = params
    B, T, C = x.shape
    h = ln(x, (C,), w_ln, b_ln)
    q, k, v = (h @ w_qkv).split(C, dim=2)
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
    y = attn(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
    out = x + y @ w_proj
    return torch.autograd.grad(out, [x] + list(params), dy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["cpu-config", "gpu-config"])
@pytest.mark.parametrize("provider", ["nanofast", "torch"])
def test_interleaved_with_torch(benchmark, record, device, config, provider):
    B, H, T, D = ATTN_CONFIGS[config]
    C = H * D
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=g).to(device).requires_grad_()
    params = [torch.ones(C), torch.zeros(C), torch.randn(C, 3 * C, generator=g) / C**0.5,
              torch.randn(C, C, generator=g) / C**0.5]
    params = [p.to(device).requires_grad_() for p in params]
    dy = torch.randn(B, T, C, generator=g).to(device)
    ln, attn = LAYER_NORM[provider], ATTENTION[provider]
    if provider == "nanofast":
        ours = _block_step(ln, attn, x, params, dy, H)
        ref = _block_step(LAYER_NORM["torch"], ATTENTION["torch"], x, params, dy, H)
        for a, b in zip(ours, ref):  # float32 sums over B*T rows: compare in norm
            assert ((a - b).norm() / b.norm()).item() < 1e-5
    timed(benchmark, lambda: _block_step(ln, attn, x, params, dy, H), device)
    flops = 3 * 2 * B * T * C * 4 * C + attention_flops(B, H, T, D, True, True)
    record(benchmark, op="block (torch matmuls + LN + attention)", case=f"{config} B{B} T{T} C{C}", mode="fwdbwd",
           dtype=torch.float32, provider=provider, device=device, work=flops, unit="GFLOP/s")
