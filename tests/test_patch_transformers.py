"""nanofast.patch on Hugging Face transformers models of each family nanofast's users fine-tune: small
random-weight configs of GPT-2, Llama, Qwen2 (grouped-query attention), Mistral (sliding window), BERT
and ViT. The patched model gives the unpatched model's loss and gradients within the parity rule
(against the float64 model), with and without padding, and unpatch() restores it. The causal
families, trained with labels, also run their LM head and loss fused (patch_loss.py).

On a machine with CUDA the models and inputs are CUDA tensors, so that bench/gpu_check.sh checks the
Triton side the same way. transformers is a test dependency only (skipped where it is not installed)."""
import copy
import pickle
import warnings

import pytest
import torch

import nanofast
from nanofast.testing import FACTOR, max_error

transformers = pytest.importorskip("transformers")

V, T, B = 97, 19, 3  # a vocabulary and a length that are not powers of two
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _every_fallback_warns(monkeypatch):
    """patch warns once per reason and process: a fresh record per test, so each test sees its own."""
    monkeypatch.setattr(nanofast.patch_attention, "_warned", set())
    monkeypatch.setattr(nanofast.patch_loss, "_warned", set())
    monkeypatch.setattr(nanofast.patch_rotary, "_warned", set())


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg)


def _mistral():
    cfg = transformers.MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     sliding_window=8)
    return transformers.MistralForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def _vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, num_labels=5, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg)


FAMILIES = {"gpt2": _gpt2, "llama": _llama, "qwen2-gqa": _qwen2, "mistral-window": _mistral, "bert": _bert,
            "vit": _vit}


def _inputs(family, padded, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        kw = dict(pixel_values=torch.randn(B, 3, 32, 32, generator=g, dtype=dtype),
                  labels=torch.randint(5, (B,), generator=g))
        return {k: v.to(DEVICE) for k, v in kw.items()}
    ids = torch.randint(V, (B, T), generator=g)
    kw = dict(input_ids=ids, labels=ids.clone())
    if padded:  # unequal lengths: left padding for the decoders, right padding for BERT
        mask = torch.ones(B, T, dtype=torch.long)
        lengths = [T, T - 5, T - 11]
        for b, n in enumerate(lengths):
            if family == "bert":
                mask[b, n:] = 0
            else:
                mask[b, :T - n] = 0
        kw["attention_mask"] = mask
        kw["labels"] = torch.where(mask.bool(), ids, -100)
    return {k: v.to(DEVICE) for k, v in kw.items()}


# what patch must have put in place in each family (besides attention, checked by the no-fallback rule)
SERVED = {
    "gpt2": (nanofast.nn.Conv1D, nanofast.nn.LayerNorm, nanofast.nn.GELU),
    "llama": (nanofast.nn.Linear, nanofast.nn.RMSNorm, "gated"),
    "qwen2-gqa": (nanofast.nn.Linear, nanofast.nn.RMSNorm, "gated"),
    "mistral-window": (nanofast.nn.Linear, nanofast.nn.RMSNorm, "gated"),
    "bert": (nanofast.nn.Linear, nanofast.nn.LayerNorm, nanofast.nn.GELU),
    "vit": (nanofast.nn.Linear, nanofast.nn.LayerNorm, nanofast.nn.GELU),
}


def _assert_served(family, model):
    for kind in SERVED[family]:
        if kind == "gated":
            assert any(type(m.__dict__.get("forward")).__name__ == "_GatedMLPForward" for m in model.modules())
        else:
            assert any(type(m) is kind for m in model.modules()), kind
    assert model.config._attn_implementation == "nanofast"


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _check(name, ours, theirs, ref, atol):
    err, torch_err = max_error(ours, ref), max_error(theirs, ref)
    assert err <= FACTOR * torch_err + atol, f"{name}: {err:.3g} > {FACTOR} * {torch_err:.3g} + {atol:g}"


def _float64_loss_and_grads(ref, inputs):
    """The loss and gradients of a float64 copy of ref: the reference of the parity rule."""
    ref64 = copy.deepcopy(ref).double()
    if hasattr(ref64, "set_experts_implementation"):  # torch's grouped matmul has no float64
        ref64.set_experts_implementation("eager")
    return _loss_and_grads(ref64, {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()})


def _assert_float32_parity(ref, inputs, loss, grads):
    """The parity rule, element by element, for a patched model's float32 loss and gradients: at most
    twice as far from the float64 model's as the unpatched model's (ref's) are, plus a small atol."""
    ref_loss, ref_grads = _loss_and_grads(ref, inputs)
    loss64, grads64 = _float64_loss_and_grads(ref, inputs)
    atol = 1e-5 if DEVICE == "cpu" else 1e-4  # CUDA's kernels (ours and torch's) reduce in other orders
    _check("loss", loss, ref_loss, loss64, atol)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        _check(n, grads[n], ref_grads[n], grads64[n], atol)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_family_matches_unpatched(family, padded):
    if family == "vit" and padded:
        pytest.skip("images have no padding")
    torch.manual_seed(0)
    ref = FAMILIES[family]().to(DEVICE).eval()  # dropout off: the two models would draw other masks
    model = nanofast.patch(copy.deepcopy(ref))
    assert model.state_dict().keys() == ref.state_dict().keys()
    _assert_served(family, model)
    inputs = _inputs(family, padded)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="nanofast.patch")  # no fallback in these configurations
        loss, grads = _loss_and_grads(model, inputs)
    _assert_float32_parity(ref, inputs, loss, grads)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_family_under_bfloat16_autocast(family):
    """The parity rule in norm: under bfloat16 autocast the patched model's loss and gradients are at
    most twice as far from the float64 model's as the unpatched model's are (plus a bfloat16-sized
    slack relative to the gradient)."""
    torch.manual_seed(0)
    ref = FAMILIES[family]().to(DEVICE).eval()
    model = nanofast.patch(copy.deepcopy(ref))
    inputs = _inputs(family, padded=family != "vit")
    with torch.autocast(DEVICE, dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.filterwarnings("error", message="nanofast.patch")  # no fallback under autocast either
        loss, grads = _loss_and_grads(model, inputs)
    _assert_bfloat16_parity(ref, inputs, loss, grads)


def _assert_bfloat16_parity(ref, inputs, loss, grads):
    """The parity rule in norm for a patched model's loss and gradients under bfloat16 autocast: at most
    twice as far from the float64 model's as the unpatched model's (ref's) are, plus a bfloat16-sized
    slack relative to the gradient (the norm, because a tiny model's largest elementwise error is one
    unlucky rounding)."""
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(ref, inputs)
    loss64, grads64 = _float64_loss_and_grads(ref, inputs)
    assert grads.keys() == ref_grads.keys() == grads64.keys()
    for n, g64 in [("loss", loss64), *grads64.items()]:
        ours, theirs = (loss, ref_loss) if n == "loss" else (grads[n], ref_grads[n])
        err, torch_err = ((t.double() - g64).norm().item() for t in (ours, theirs))
        assert err <= FACTOR * torch_err + 2 ** -8 * g64.norm().item(), f"{n}: {err:.3g} > {FACTOR} * {torch_err:.3g}"


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_softcapped_attention_falls_back_to_the_models_eager_attention(padded):
    """Gemma 2's attention takes a softcap that nanofast's does not: that call runs the model's own eager
    attention (transformers' sdpa refuses a softcap) with the mask the "nanofast" implementation built,
    padding and sliding window included, and says so once; the rest stays patched."""
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=64, sliding_window=8)
    torch.manual_seed(0)
    ref = transformers.Gemma2ForCausalLM(cfg).to(DEVICE).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = nanofast.patch(copy.deepcopy(ref))
        inputs = _inputs("llama", padded=False)
        # right padding shorter than the window: no row is fully masked (transformers' float64 eager
        # attention gives such rows NaN, which reach the other rows' outputs through zero weights)
        if padded:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            inputs["attention_mask"][1, T - 3:] = inputs["attention_mask"][2, T - 5:] = 0
            inputs["labels"] = inputs["labels"].masked_fill(inputs["attention_mask"] == 0, -100)
        loss, grads = _loss_and_grads(model, inputs)
        _loss_and_grads(model, inputs)
    fallbacks = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(fallbacks) == 1 and "softcap" in fallbacks[0] and "eager attention" in fallbacks[0], fallbacks
    assert any(isinstance(m, nanofast.nn.Linear) for m in model.modules())
    _assert_float32_parity(ref, inputs, loss, grads)


def _more_families():
    small = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    tf = transformers
    return {  # (model class, config): pieces under other names, norms and activations
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(head_dim=16, **small)),  # RMSNorm of q and k per head
        "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(head_dim=16, **small)),  # x * (1 + w), tanh-GELU gate
        "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(pad_token_id=0, eos_token_id=2, **small)),  # fused gate_up
        "olmo2": (tf.Olmo2ForCausalLM, tf.Olmo2Config(pad_token_id=0, eos_token_id=2, **small)),  # norms after
        "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(  # partial rotary, parallel residual
            vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, eos_token_id=2, bos_token_id=1)),
        "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **small)),
    }


@pytest.mark.parametrize("family", ["qwen3", "gemma", "phi3", "olmo2", "gpt_neox", "mixtral"])
def test_more_families_patch_without_fallback(family):
    """Families beyond the six above, recognised by what their pieces compute: no fallback, and the
    loss and gradients with left padding within the parity rule against the float64 model."""
    cls, cfg = _more_families()[family]
    torch.manual_seed(0)
    ref = cls(cfg).to(DEVICE).eval()
    model = nanofast.patch(copy.deepcopy(ref))
    assert any(isinstance(m, nanofast.nn.Linear) for m in model.modules())
    assert any(isinstance(m, (nanofast.nn.RMSNorm, nanofast.nn.LayerNorm)) for m in model.modules())
    assert model.config._attn_implementation == "nanofast"
    inputs = _inputs("llama", padded=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="nanofast.patch")
        loss, grads = _loss_and_grads(model, inputs)
    _assert_float32_parity(ref, inputs, loss, grads)


def test_patch_keeps_parameters_and_unpatch_restores():
    torch.manual_seed(0)
    model = _gpt2()
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    implementation = model.config._attn_implementation
    nanofast.patch(model)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert any(isinstance(m, nanofast.nn.Conv1D) for m in model.modules())
    assert model.config._attn_implementation == "nanofast"
    nanofast.unpatch(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert model.config._attn_implementation == implementation


def test_unpatch_restores_a_llama():
    torch.manual_seed(0)
    model = _llama().to(DEVICE)
    before = {n: type(m) for n, m in model.named_modules()}
    inputs = _inputs("llama", padded=True)
    ref = model(**inputs).loss
    nanofast.patch(model)
    assert any(isinstance(m, nanofast.nn.RMSNorm) for m in model.modules())
    nanofast.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(model(**inputs).loss, ref)


def test_unpatched_model_is_not_routed():
    """Patching one model routes that model's attention only: another instance keeps torch's."""
    torch.manual_seed(0)
    patched, plain = nanofast.patch(_llama().to(DEVICE)), _llama().to(DEVICE)
    assert patched.config._attn_implementation == "nanofast"
    assert plain.config._attn_implementation != "nanofast"
    calls = []
    real = nanofast.ops.scaled_dot_product_attention
    nanofast.ops.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        plain(**_inputs("llama", padded=False))
        assert calls == []
        patched(**_inputs("llama", padded=False))
        assert len(calls) == 2
    finally:
        nanofast.ops.scaled_dot_product_attention = real


# ---- the LM head and its loss (patch_loss.py) ----

CAUSAL = ["gpt2", "llama", "qwen2-gqa", "mistral-window"]


@pytest.fixture
def fused_calls(monkeypatch):
    """The rows of each ops.linear_cross_entropy call the patched models make."""
    calls, real = [], nanofast.ops.linear_cross_entropy
    monkeypatch.setattr(nanofast.ops, "linear_cross_entropy", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    return calls


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("family", CAUSAL)
def test_fused_loss_matches_unpatched(family, padded, fused_calls):
    """Training with labels (these configs have no dropout), the head and the loss run as one
    linear_cross_entropy over every position, with the unpatched model's loss and gradients."""
    torch.manual_seed(0)
    ref = FAMILIES[family]().to(DEVICE).train()
    model = nanofast.patch(copy.deepcopy(ref))
    inputs = _inputs(family, padded)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="nanofast.patch")
        loss, grads = _loss_and_grads(model, inputs)
    assert fused_calls == [B * T]
    _assert_float32_parity(ref, inputs, loss, grads)


@pytest.mark.parametrize("family", CAUSAL)
def test_fused_loss_under_bfloat16_autocast(family, fused_calls):
    torch.manual_seed(0)
    ref = FAMILIES[family]().to(DEVICE).train()
    model = nanofast.patch(copy.deepcopy(ref))
    inputs = _inputs(family, padded=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, inputs)
    assert fused_calls == [B * T]
    assert loss.dtype == torch.float32
    _assert_bfloat16_parity(ref, inputs, loss, grads)


def test_fused_loss_keeps_gpt2_tied_weights():
    """GPT-2's lm_head is its token embedding: the one Parameter gets both gradients."""
    torch.manual_seed(0)
    ref = _gpt2().to(DEVICE).train()
    model = nanofast.patch(copy.deepcopy(ref))
    assert model.lm_head.weight is model.transformer.wte.weight
    inputs = _inputs("gpt2", padded=True)
    _, grads = _loss_and_grads(model, inputs)
    _, ref_grads = _loss_and_grads(ref, inputs)
    torch.testing.assert_close(grads["transformer.wte.weight"], ref_grads["transformer.wte.weight"], rtol=1e-4,
                               atol=1e-6)
    nanofast.unpatch(model)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_fused_loss_logits_are_none_only_when_training_with_labels(fused_calls):
    """Fused (training, grad on, labels): outputs.logits is None, and a tuple output leaves it out.
    Without labels, under no_grad or in eval mode the logits are computed as unpatched."""
    torch.manual_seed(0)
    ref = _llama().to(DEVICE).train()
    model = nanofast.patch(copy.deepcopy(ref))
    inputs = _inputs("llama", padded=True)
    out = model(**inputs)
    assert out.logits is None and "logits" not in out and out.loss is not None
    as_tuple = model(**inputs, return_dict=False)
    assert len(as_tuple) == len(ref(**inputs, return_dict=False)) - 1
    assert torch.equal(as_tuple[0], out.loss)
    assert len(fused_calls) == 2
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        evaluated = model(**inputs)
    model.eval()
    in_eval = model(**inputs)
    model.train()
    for ours in (model(**no_labels), evaluated, in_eval):
        assert ours.logits is not None
        torch.testing.assert_close(ours.logits, ref(**no_labels).logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(evaluated.loss, ref(**inputs).loss, rtol=1e-4, atol=1e-5)
    assert len(fused_calls) == 2  # none of these ran the fused loss


def test_fused_loss_takes_num_items_in_batch():
    """transformers' loss kwargs: with num_items_in_batch the loss is the sum divided by it."""
    torch.manual_seed(0)
    ref = _qwen2().to(DEVICE).train()
    model = nanofast.patch(copy.deepcopy(ref))
    inputs = _inputs("qwen2-gqa", padded=True)
    count = torch.tensor(2 * int((inputs["labels"][:, 1:] != -100).sum()), device=DEVICE)  # as accumulation gives
    torch.testing.assert_close(model(**inputs, num_items_in_batch=count).loss,
                               ref(**inputs, num_items_in_batch=count).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["mean", "num_items", "shift_labels", "ignore_index"])
def test_causal_lm_loss_is_transformers_loss(case):
    """patch_loss.causal_lm_loss against transformers' ForCausalLMLoss on the logits it never stores."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    weight = torch.randn(V, 16, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    labels = torch.randint(V, (2, 9), generator=g).to(DEVICE)
    labels[0, :3] = 5 if case == "ignore_index" else -100  # (the shift pads with ignore_index, too)
    kwargs = {"num_items": dict(num_items_in_batch=torch.tensor(23)),
              "shift_labels": dict(shift_labels=labels.roll(-2, 1)),
              "ignore_index": dict(ignore_index=5)}.get(case, {})
    ours = nanofast.patch_loss.causal_lm_loss(hidden, weight, None, labels, **kwargs)
    theirs = ForCausalLMLoss(hidden @ weight.t(), labels, V, **kwargs)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(theirs, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_loss_off_and_unpatch_restore(fused_calls):
    torch.manual_seed(0)
    model = _mistral().to(DEVICE).train()
    loss_function = model.loss_function
    inputs = _inputs("mistral-window", padded=True)
    before = model(**inputs)
    nanofast.patch(model, fused_loss=False)
    assert model(**inputs).logits is not None and fused_calls == []
    nanofast.unpatch(model)
    nanofast.patch(model)
    assert model(**inputs).logits is None and len(fused_calls) == 1
    restored = pickle.loads(pickle.dumps(model))  # the hooks pickle with the model
    assert restored(**inputs).logits is None
    nanofast.unpatch(model)
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", "_loss_function"))
    assert model.loss_function is loss_function
    after = model(**inputs)
    assert torch.equal(after.loss, before.loss) and torch.equal(after.logits, before.logits)


def test_changed_logits_keep_transformers_loss():
    """Gemma 2 softcaps its logits before the loss: not fused, with one warning saying why."""
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    final_logit_softcapping=30.0, attn_logit_softcapping=None)
    model = transformers.Gemma2ForCausalLM(cfg).to(DEVICE).train()
    with pytest.warns(UserWarning, match="Gemma2ForCausalLM's LM head and loss stay transformers' .*changes the logits"):
        nanofast.patch(model)
    assert model(**_inputs("llama", padded=False)).logits is not None


@pytest.mark.slow
def test_fused_loss_and_rotary_under_torch_compile():
    torch.manual_seed(0)
    ref = _llama().to(DEVICE).train()
    model = nanofast.patch(copy.deepcopy(ref))
    inputs = _inputs("llama", padded=True)
    out = torch.compile(model)(**inputs)
    assert out.logits is None
    ref_loss, _ = _loss_and_grads(ref, inputs)
    torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()


# ---- the rotary embedding (patch_rotary.py) ----

def _rotary_copies(model):
    """The attention modules' own copies of apply_rotary_pos_emb (transformers makes them where
    Hugging Face's kernels package is installed)."""
    return [m._kernel_funcs["rotary_pos_emb"] for m in model.modules()
            if "rotary_pos_emb" in (m.__dict__.get("_kernel_funcs") or {})]


@pytest.mark.parametrize("family", ["llama", "qwen2-gqa", "mistral-window"])
def test_rotary_routed_per_instance(family, monkeypatch):
    torch.manual_seed(0)
    model = FAMILIES[family]().to(DEVICE)
    if not _rotary_copies(model):
        pytest.skip("attention modules have their own apply_rotary_pos_emb only with the kernels package")
    calls, real = [], nanofast.ops.apply_rotary_pos_emb
    monkeypatch.setattr(nanofast.ops, "apply_rotary_pos_emb", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = copy.deepcopy(model)
    nanofast.patch(model)
    inputs = _inputs(family, padded=True)
    plain(**inputs)
    assert calls == []  # another instance of the same class keeps transformers' function
    model(**inputs)
    assert len(calls) == model.config.num_hidden_layers
    nanofast.unpatch(model)
    model(**inputs)
    assert len(calls) == model.config.num_hidden_layers
    assert all("forward" not in c.__dict__ for c in _rotary_copies(model))


def test_rotary_recognised_by_what_it_computes():
    """A copy is routed only where its function computes the op: rotating halves (Llama's), pairs
    (interleaved), not anything else that takes the same arguments."""
    kernels = pytest.importorskip("kernels")
    if not hasattr(kernels, "use_kernel_forward_from_hub"):  # this repository's kernels/ (Triton), not the hub's
        pytest.skip("Hugging Face's kernels package is not installed")
    from transformers.models.llama import modeling_llama

    def every_two(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    @kernels.use_kernel_forward_from_hub("rotary_pos_emb")
    def pairs(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + every_two(q) * sin, k * cos + every_two(k) * sin

    @kernels.use_kernel_forward_from_hub("rotary_pos_emb")
    def scaled(q, k, cos, sin, unsqueeze_dim=1):
        return q * cos.unsqueeze(unsqueeze_dim), k * sin.unsqueeze(unsqueeze_dim)

    known = nanofast.patch_rotary._known
    assert known(type(modeling_llama.apply_rotary_pos_emb))[1] is False
    assert known(type(pairs))[1] is True
    assert known(type(scaled))[1] is None
