"""nanofast.model: nanoGPT's GPT on nanofast's kernels (or torch's)."""
import math

import pytest
import torch

from nanofast.model import GPT, NANOGPT_MODEL_ARGS, GPTConfig

KERNELS = ["torch", "nanofast"]


def tiny(kernels="torch", **kw):
    args = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True, kernels=kernels)
    args.update(kw)
    return GPTConfig(**args)


def nanogpt_keys(n_layer, bias):
    """The state_dict keys of nanoGPT's GPT (model.py, flash attention) in order."""
    keys = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        keys.append(p + "ln_1.weight")
        if bias:
            keys.append(p + "ln_1.bias")
        for lin in ("attn.c_attn", "attn.c_proj"):
            keys.append(p + lin + ".weight")
            if bias:
                keys.append(p + lin + ".bias")
        keys.append(p + "ln_2.weight")
        if bias:
            keys.append(p + "ln_2.bias")
        for lin in ("mlp.c_fc", "mlp.c_proj"):
            keys.append(p + lin + ".weight")
            if bias:
                keys.append(p + lin + ".bias")
    keys.append("transformer.ln_f.weight")
    if bias:
        keys.append("transformer.ln_f.bias")
    keys.append("lm_head.weight")
    return keys


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_keys_are_nanogpts(bias):
    m = GPT(tiny(bias=bias, n_layer=3))
    assert list(m.state_dict().keys()) == nanogpt_keys(3, bias)
    sd = m.state_dict()
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (128, 32)


def test_init_and_weight_tying():
    torch.manual_seed(0)
    m = GPT(tiny(n_layer=4, n_embd=256, n_head=4, vocab_size=512, block_size=256))
    assert m.transformer.wte.weight is m.lm_head.weight
    std = lambda t: t.detach().float().std().item()
    assert abs(std(m.transformer.h[0].mlp.c_fc.weight) - 0.02) < 0.002
    want = 0.02 / math.sqrt(2 * 4)
    assert abs(std(m.transformer.h[0].attn.c_proj.weight) - want) < 0.001
    assert abs(std(m.transformer.h[3].mlp.c_proj.weight) - want) < 0.001
    assert abs(std(m.transformer.wpe.weight) - 0.02) < 0.002
    assert torch.all(m.transformer.h[0].attn.c_attn.bias == 0)
    assert torch.all(m.transformer.ln_f.weight == 1)
    # the same seed gives the same model (nanoGPT's construction order)
    torch.manual_seed(0)
    m2 = GPT(tiny(n_layer=4, n_embd=256, n_head=4, vocab_size=512, block_size=256, kernels="nanofast"))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert m.get_num_params() == m.get_num_params(non_embedding=False) - 256 * 256


@pytest.mark.parametrize("kernels", KERNELS)
def test_forward_and_loss(kernels):
    torch.manual_seed(0)
    m = GPT(tiny(kernels)).use_fused_loss(False)  # the logits too (test_fused_loss: without them)
    idx = torch.randint(0, 37, (3, 16))
    logits, loss = m(idx, torch.randint(0, 37, (3, 16)))
    assert logits.shape == (3, 16, 37)
    assert abs(loss.item() - math.log(37)) < 0.3  # about uniform at init
    logits, loss = m(idx)
    assert logits.shape == (3, 1, 37) and loss is None
    with pytest.raises(AssertionError):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bias", [True, False])
def test_nanofast_kernels_match_torch(bias):
    torch.manual_seed(0)
    ref = GPT(tiny("torch", bias=bias))
    nf = GPT(tiny("nanofast", bias=bias)).use_fused_loss(False)  # the logits too (test_fused_loss: without them)
    nf.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 37, (4, 16))
    tgt = torch.randint(0, 37, (4, 16))
    out = []
    for m in (ref, nf):
        logits, loss = m(idx, tgt)
        loss.backward()
        out.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
    for n in out[0][1]:
        torch.testing.assert_close(out[1][1][n], out[0][1][n], rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss(autocast):
    """nanofast's kernels on the CPU compute lm_head and the loss together (ops.linear_cross_entropy): no
    logits, the loss and every gradient (wte's, tied to lm_head, included) as with torch's kernels."""
    torch.manual_seed(0)
    ref = GPT(tiny("torch"))
    nf = GPT(tiny("nanofast"))
    nf.load_state_dict(ref.state_dict())
    idx, tgt = torch.randint(0, 37, (4, 16)), torch.randint(0, 37, (4, 16))
    tgt[1, 3:7] = -1  # ignored, as nanoGPT's -1
    out = []
    for m in (ref, nf):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = m(idx, tgt)
        loss.backward()
        out.append((logits, loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert out[0][0].shape == (4, 16, 37) and out[1][0] is None
    assert nf.lm_head.weight is nf.transformer.wte.weight
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], **tol)
    for n in out[0][2]:
        torch.testing.assert_close(out[1][2][n], out[0][2][n], **tol, msg=n)
    # evaluation (no autograd), and the same loss as the unfused head
    nf.eval()
    with torch.no_grad():
        fused = nf(idx, tgt)[1]
        logits, unfused = nf.use_fused_loss(False)(idx, tgt)
    torch.testing.assert_close(fused, unfused)
    assert logits.shape == (4, 16, 37)


def test_fused_loss_leaves_a_hooked_head_alone():
    m = GPT(tiny("nanofast"))
    seen = []
    m.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    logits, _ = m(torch.randint(0, 37, (2, 16)), torch.randint(0, 37, (2, 16)))
    assert seen == [(2, 16, 37)] and logits.shape == (2, 16, 37)


def test_nanofast_kernels_are_called_with_strided_views(monkeypatch):
    from nanofast import ops
    calls = {"ln": 0, "add_ln": 0, "sdpa": []}
    real_ln, real_add_ln, real_sdpa = ops.layer_norm, ops.add_layer_norm, ops.scaled_dot_product_attention

    def ln(x, shape, weight=None, bias=None, eps=1e-5):
        calls["ln"] += 1
        assert tuple(shape) == (32,) and eps == 1e-5
        return real_ln(x, shape, weight, bias, eps)

    def add_ln(x, delta, shape, weight=None, bias=None, eps=1e-5, out_dtype=None):
        calls["add_ln"] += 1
        assert tuple(shape) == (32,) and eps == 1e-5 and delta.shape == x.shape
        return real_add_ln(x, delta, shape, weight, bias, eps, out_dtype)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        calls["sdpa"].append((q.is_contiguous(), q.shape, q.stride(), dropout_p, is_causal))
        return real_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    monkeypatch.setattr(ops, "layer_norm", ln)
    monkeypatch.setattr(ops, "add_layer_norm", add_ln)
    monkeypatch.setattr(ops, "scaled_dot_product_attention", sdpa)
    # the per-op blocks (the fused ones call the launchers directly: tests/test_fused_block.py)
    m = GPT(tiny("nanofast", dropout=0.25)).use_fused_blocks(False)
    m(torch.randint(0, 37, (3, 16)))
    # 2 blocks x 2 norms + ln_f: the first alone, the other four fused with the residual add before them
    assert calls["ln"] == 1 and calls["add_ln"] == 4
    assert len(calls["sdpa"]) == 2
    contiguous, shape, stride, p, causal = calls["sdpa"][0]
    assert not contiguous and shape == (3, 2, 16, 16) and stride == (16 * 96, 16, 96, 1)
    assert p == 0.25 and causal is True
    m.eval()
    m(torch.randint(0, 37, (3, 16)))
    assert calls["sdpa"][-1][3] == 0.0  # no dropout in eval mode


def test_bad_kernels_name():
    with pytest.raises(ValueError, match="kernels"):
        GPTConfig(kernels="triton")


@pytest.mark.parametrize("kernels", KERNELS)
def test_dropout_reproducible(kernels):
    m = GPT(tiny(kernels, dropout=0.2))
    idx = torch.randint(0, 37, (2, 16))
    torch.manual_seed(5)
    a = m(idx, idx)[1]
    torch.manual_seed(5)
    b = m(idx, idx)[1]
    c = m(idx, idx)[1]
    assert a.item() == b.item() and a.item() != c.item()


@pytest.mark.parametrize("kernels", KERNELS)
def test_generate(kernels):
    torch.manual_seed(0)
    m = GPT(tiny(kernels)).eval()
    idx = torch.randint(0, 37, (2, 5))
    out = m.generate(idx, 20, temperature=0.8, top_k=5)  # runs past block_size: the context is cropped
    assert out.shape == (2, 25) and torch.equal(out[:, :5], idx)
    assert int(out.min()) >= 0 and int(out.max()) < 37
    greedy = m.generate(idx, 20, temperature=0)
    assert torch.equal(m.generate(idx, 20, temperature=1.0, top_k=1), greedy)
    torch.manual_seed(1)
    a = m.generate(idx, 10)
    torch.manual_seed(1)
    assert torch.equal(m.generate(idx, 10), a)
    # greedy decoding by hand
    x = idx[:1]
    for _ in range(3):
        x = torch.cat([x, m(x)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(x, greedy[:1, :8])


def nanogpt_checkpoint(model):
    """A checkpoint as nanoGPT's train.py writes it after torch.compile."""
    cfg = model.config
    return {
        "model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
        "optimizer": {},
        "model_args": dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                           bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.1),
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.5),
        "config": {"dataset": "shakespeare_char"},
    }


def test_loads_nanogpt_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = GPT(tiny()).eval()
    ck = nanogpt_checkpoint(ref)
    ck["model"]["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)  # pre-flash mask buffer
    path = tmp_path / "ckpt.pt"
    torch.save(ck, path)
    for kernels in KERNELS:
        m = GPT.from_checkpoint(path, kernels=kernels).eval()
        assert m.config.dropout == 0.1 and m.config.kernels == kernels
        idx = torch.randint(0, 37, (2, 16))
        torch.testing.assert_close(m(idx)[0], ref(idx)[0])
    m = GPT.from_checkpoint(ck, override_args=dict(dropout=0.0))
    assert m.config.dropout == 0.0


def test_nanogpt_can_load_our_weights():
    """What nanoGPT's sample.py does with a checkpoint: GPTConfig(**model_args), load_state_dict."""
    m = GPT(tiny(kernels="nanofast"))
    model_args = {k: getattr(m.config, k) for k in NANOGPT_MODEL_ARGS}
    nanogpt_fields = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}
    assert set(model_args) == nanogpt_fields
    sd = m.state_dict()
    assert list(sd) == nanogpt_keys(2, True)
    m2 = GPT(GPTConfig(**model_args))
    m2.load_state_dict(sd)  # strict


def test_checkpoint_shape_mismatch_is_clear():
    from nanofast.checkpoint import CheckpointError
    ck = nanogpt_checkpoint(GPT(tiny()))
    ck["model_args"]["n_embd"] = 64
    with pytest.raises(CheckpointError, match="wrong shapes"):
        GPT.from_checkpoint(ck)
    ck = nanogpt_checkpoint(GPT(tiny()))
    del ck["model"]["_orig_mod.lm_head.weight"]
    ck["model"]["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing.*unexpected"):
        GPT.from_checkpoint(ck)


def test_crop_block_size():
    torch.manual_seed(0)
    m = GPT(tiny(block_size=32)).eval()
    idx = torch.randint(0, 37, (1, 8))
    before = m(idx)[0]
    m.crop_block_size(8)
    assert m.config.block_size == 8 and m.transformer.wpe.weight.shape == (8, 32)
    torch.testing.assert_close(m(idx)[0], before)


def test_configure_optimizers():
    m = GPT(tiny(bias=True))
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, nodecay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and nodecay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in nodecay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())


def test_estimate_mfu():
    m = GPT(tiny())
    N = m.get_num_params()
    flops_per_iter = (6 * N + 12 * 2 * 2 * 16 * 16) * 16 * 4
    assert m.estimate_mfu(4, 0.5, peak_flops=1e9) == pytest.approx(flops_per_iter / 0.5 / 1e9)
    assert m.estimate_mfu(4, 0.5) == pytest.approx(flops_per_iter / 0.5 / 312e12)  # nanoGPT's A100 default
