"""The CUDA ops torch.compile sees into: the triton_op twins of nanofast's raw ops (nanofast::*_triton)
and the launchers they trace.

Without a GPU: each triton_op body runs on CPU tensors under Triton's interpreter and must equal the
C++ op bit for bit where the arithmetic allows (within rounding elsewhere); each CUDA launcher runs
on fake tensors with a recording `launch`, which fails on any host read (.item(), data_ptr(),
int(tensor)) and checks that every grid is a tuple of ints. With a GPU: torch.compile(fullgraph=True)
of the ops records the kernel launches (triton_kernel_wrapper_functional) and no opaque nanofast op,
forward and backward, with eager's results; dropout seeds are drawn on the device.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton", reason="triton is not installed (pip install 'nanofast[test]')")

import nanofast.ops as ops  # noqa: E402
from nanofast.ops import cuda  # noqa: E402
from nanofast.ops.seed import draw_seed  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
nf = torch.ops.nanofast


def _randn(*shape, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, dtype)


def _close(a, b, tol=2e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.cpu(), y.cpu(), rtol=tol, atol=tol)


# ---- the triton_op bodies against the C++ ops (CPU tensors; the GPU runs them natively) ----

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("N,C", [(37, 100), (1, 1), (7, 65)])
def test_layer_norm_triton_ops_match_the_cpu_ops(N, C, affine):
    x, dy = _randn(N, C, seed=1), _randn(N, C, seed=2)
    w, b = (_randn(C, seed=3), _randn(C, seed=4)) if affine else (None, None)
    ours = nf.layer_norm_fwd_triton(x, w, b, 1e-5)
    ref = nf.layer_norm_fwd(*(None if t is None else t.cpu() for t in (x, w, b)), 1e-5)
    _close(ours, ref)
    grads = nf.layer_norm_bwd_triton(dy, x, w, ours[1], ours[2], affine, affine)
    ref_grads = nf.layer_norm_bwd(dy.cpu(), x.cpu(), None if w is None else w.cpu(), ref[1], ref[2], affine, affine)
    assert [g.shape for g in grads] == [g.shape for g in ref_grads]  # fixed arity: empty where not asked for
    _close(grads, ref_grads, 2e-5)


@pytest.mark.parametrize("same_dtype", [True, False])
def test_add_layer_norm_triton_ops_match_the_cpu_ops(same_dtype):
    C = 48
    x, dy, dh = _randn(9, C, seed=5), _randn(9, C, seed=6), _randn(9, C, seed=7)
    r = _randn(9, C, seed=8, dtype=torch.float32 if same_dtype else torch.bfloat16)
    w, b = _randn(C, seed=9), _randn(C, seed=10)
    ours = nf.add_layer_norm_fwd_triton(x, r, w, b, 1e-5, torch.float32)
    ref = nf.add_layer_norm_fwd(x.cpu(), r.cpu(), w.cpu(), b.cpu(), 1e-5, torch.float32)
    _close(ours, ref)
    grads = nf.add_layer_norm_bwd_triton(dy, dh, ours[0], w, ours[2], ours[3], r.dtype, True, True)
    ref_grads = nf.add_layer_norm_bwd(dy.cpu(), dh.cpu(), ref[0], w.cpu(), ref[2], ref[3], r.dtype, True, True)
    assert [g.shape for g in grads] == [g.shape for g in ref_grads]
    _close(grads, ref_grads, 2e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_attention_triton_ops_match_the_cpu_ops(causal, p):
    B, H, Tq, Tk, D = 2, 3, 17, 33 if not causal else 17, 24
    q, k, v, do = _randn(B, H, Tq, D, seed=11), _randn(B, H, Tk, D, seed=12), _randn(B, H, Tk, D, seed=13), \
        _randn(B, H, Tq, D, seed=14)
    seed = torch.tensor([2 ** 40 + 7]) if p else None
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731  (the seed on the kernels' device)
    ours = nf.sdpa_fwd_triton(q, k, v, causal, 0.2, p, on(seed))
    ref = nf.sdpa_fwd(q.cpu(), k.cpu(), v.cpu(), causal, 0.2, p, seed)
    _close(ours, ref, 2e-5)  # the same dropout mask: the same seed value on both devices
    grads = nf.sdpa_bwd_triton(do, q, k, v, ours[0], ours[1], causal, 0.2, p, on(seed))
    ref_grads = nf.sdpa_bwd(do.cpu(), q.cpu(), k.cpu(), v.cpu(), ref[0], ref[1], causal, 0.2, p, seed)
    _close(grads, ref_grads, 2e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_triton_ops_match_the_cpu_ops(residual):
    C = 40
    x, dy, w = _randn(9, C, seed=15), _randn(9, C, seed=16), _randn(C, seed=17)
    r = _randn(9, C, seed=18) if residual else None
    args = (1e-6, 0.0, True, torch.float32)
    ours = nf.rms_norm_fwd_triton(x, r, w, *args)
    ref = nf.rms_norm_fwd(x.cpu(), None if r is None else r.cpu(), w.cpu(), *args)
    _close(ours, ref)
    rdt = torch.float32 if residual else None
    saved = ours[0] if residual else x
    grads = nf.rms_norm_bwd_triton(dy, dy if residual else None, saved, w, ours[2], 0.0, True, rdt, True)
    ref_grads = nf.rms_norm_bwd(dy.cpu(), dy.cpu() if residual else None, saved.cpu(), w.cpu(), ref[2], 0.0, True,
                                rdt, True)
    assert [g.shape for g in grads] == [g.shape for g in ref_grads]
    _close(grads, ref_grads, 2e-5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_masked_grouped_attention_triton_ops_match_the_cpu_ops(mask_dtype):
    # a (B, 1, 1, Tk) padding mask, two query heads per key/value head, a sliding window, dropout
    B, H, Hkv, T, D = 2, 4, 2, 29, 16
    q, do = _randn(B, H, T, D, seed=15), _randn(B, H, T, D, seed=16)
    k, v = _randn(B, Hkv, T, D, seed=17), _randn(B, Hkv, T, D, seed=18)
    keep = (torch.arange(T) < torch.tensor([T, 11])[:, None]).view(B, 1, 1, T)
    mask = keep if mask_dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    seed = torch.tensor([12345])
    ours = nf.sdpa_fwd_triton(q, k, v, True, 0.3, 0.2, seed.to(DEVICE), mask.to(DEVICE), 9)
    ref = nf.sdpa_fwd(q.cpu(), k.cpu(), v.cpu(), True, 0.3, 0.2, seed, mask, 9)
    _close(ours, ref, 2e-5)
    grads = nf.sdpa_bwd_triton(do, q, k, v, ours[0], ours[1], True, 0.3, 0.2, seed.to(DEVICE), mask.to(DEVICE), 9)
    ref_grads = nf.sdpa_bwd(do.cpu(), q.cpu(), k.cpu(), v.cpu(), ref[0], ref[1], True, 0.3, 0.2, seed, mask, 9)
    assert [g.shape for g in grads] == [g.shape for g in ref_grads]
    _close(grads, ref_grads, 2e-5)


# ---- the launchers are traceable: fake tensors, a recording launch ----

class _Recorder:
    """A `launch` that records each launch instead of running it, checking what torch.compile's
    tracing of a triton_op body needs: a tuple grid of ints and kernel arguments that are tensors,
    numbers or constexprs (never a value read back from a tensor)."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        def at(grid):
            assert isinstance(grid, tuple) and 1 <= len(grid) <= 3, grid
            assert all(isinstance(g, int) for g in grid), grid

            def run(*args, **kwargs):
                for a in list(args) + list(kwargs.values()):
                    assert isinstance(a, (torch.Tensor, int, float, bool, str)), type(a)
                self.launches.append(getattr(kernel, "__name__", str(kernel)))
            return run
        return type("Launch", (), {"__getitem__": lambda self, grid: at(grid)})()


def _fake_launches(fn):
    """Runs fn(launch) under FakeTensorMode (any host read raises there) and returns the kernels it
    launched."""
    rec = _Recorder()
    with FakeTensorMode(allow_non_fake_inputs=False):
        out = fn(rec)
    flat = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
    assert all(isinstance(t, torch.Tensor) for t in flat)
    return rec.launches


def _e(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=DEVICE)


def test_cuda_launchers_are_traceable():
    ln = _fake_launches(lambda launch: cuda.layer_norm_forward(_e(64, 96), _e(96), None, 1e-5,
                                                               launch=launch))
    assert ln == ["_layer_norm_fwd_kernel"]
    ln_bwd = _fake_launches(lambda launch: cuda.layer_norm_backward(
        _e(64, 96), _e(64, 96), _e(96), _e(64), _e(64), True, True,
        launch=launch))
    assert ln_bwd == ["_layer_norm_bwd_kernel", "_sum_partials_kernel", "_sum_partials_kernel"]
    aln = _fake_launches(lambda launch: cuda.add_layer_norm_forward(
        _e(8, 4, 96), _e(8, 4, 96, dtype=torch.bfloat16), _e(96), _e(96), 1e-5,
        torch.bfloat16, launch=launch))
    assert aln == ["_layer_norm_fwd_kernel"]
    seed = lambda: torch.zeros(1, dtype=torch.int64, device=DEVICE)  # noqa: E731  (made under the fake mode)
    fwd = _fake_launches(lambda launch: cuda.attention_forward(
        _e(2, 3, 40, 24), _e(2, 3, 40, 24), _e(2, 3, 40, 24), True, 0.2, 0.1, seed(),
        launch=launch))
    assert fwd == ["_attn_fwd_kernel"]
    bwd = _fake_launches(lambda launch: cuda.attention_backward(
        *(_e(2, 3, 40, 24) for _ in range(5)), _e(2, 3, 40), False, 0.2, 0.1, seed(),
        launch=launch))
    assert bwd == ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
    # a broadcast mask (stride 0 read from the fake's strides), grouped heads and a window
    q, kv = (lambda: _e(2, 4, 40, 24)), (lambda: _e(2, 2, 40, 24))  # noqa: E731
    mask = lambda: _e(2, 1, 1, 40, dtype=torch.bool)  # noqa: E731
    fwd = _fake_launches(lambda launch: cuda.attention_forward(q(), kv(), kv(), True, 0.2, 0.1, seed(), mask(), 8,
                                                               launch=launch))
    assert fwd == ["_attn_fwd_kernel"]
    bwd = _fake_launches(lambda launch: cuda.attention_backward(
        q(), q(), kv(), kv(), q(), _e(2, 4, 40), True, 0.2, 0.1, seed(), mask(), 8, launch=launch))
    assert bwd == ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]


def test_rms_norm_launchers_are_traceable():
    fwd = _fake_launches(lambda launch: cuda.rms_norm_forward(_e(64, 96), _e(64, 96), _e(96), 1e-6, 0.0, True,
                                                              torch.float32, launch=launch))
    bwd = _fake_launches(lambda launch: cuda.rms_norm_backward(_e(64, 96), _e(64, 96), _e(64, 96), _e(96), _e(64),
                                                               0.0, True, torch.float32, True, launch=launch))
    assert fwd and bwd


def test_a_host_read_would_fail_the_traceability_check():
    """The check above can fail: a launcher that reads the seed's value on the host raises there."""
    def reads_seed(launch):
        seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        return cuda.attention_forward(_e(1, 1, 8, 16), _e(1, 1, 8, 16), _e(1, 1, 8, 16),
                                      False, 1.0, 0.5, int(seed), launch=launch)
    with pytest.raises(Exception):
        _fake_launches(reads_seed)


# ---- seeds ----

def test_seeds_are_drawn_on_the_tensors_device_and_reproduce():
    s = draw_seed(torch.device(DEVICE))
    assert s.device.type == DEVICE and s.dtype == torch.int64 and s.shape == (1,)
    torch.manual_seed(5)
    a = draw_seed(torch.device(DEVICE))
    torch.manual_seed(5)
    assert torch.equal(a, draw_seed(torch.device(DEVICE)))


# ---- on a GPU: the compiled graph records the kernels, not an opaque op ----

def _graph_ops(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: inductor compiles user Triton kernels for GPUs only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_ops_record_the_triton_kernels(dtype):
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def block(x, w, b):
        h = ops.layer_norm(x, (x.shape[-1],), w, b)
        q = h.view(2, 64, 4, 32).transpose(1, 2)
        y = ops.scaled_dot_product_attention(q, q, q, is_causal=True, dropout_p=0.1)
        s, y2 = ops.add_layer_norm(x, y.transpose(1, 2).reshape_as(x), (x.shape[-1],), w, b)
        return (s + y2).sum()

    x, w, b = (_randn(*shape, seed=i, dtype=dtype).requires_grad_() for i, shape in
               enumerate([(2, 64, 128), (128,), (128,)]))
    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True)
    torch.manual_seed(0)
    loss = compiled(x, w, b)
    loss.backward()
    assert len(graphs) == 2
    for gm in graphs:
        names = _graph_ops(gm)
        assert any("triton_kernel_wrapper_functional" in n for n in names), names
        assert not any(n.startswith("nanofast.") for n in names), names
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    torch.manual_seed(0)  # the same device seed, so the same dropout mask, in eager mode
    eager = block(x, w, b)
    eager.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, eager, rtol=tol, atol=tol)
    for g, t in zip(grads, (x, w, b)):
        torch.testing.assert_close(g, t.grad, rtol=tol, atol=tol * 10)
