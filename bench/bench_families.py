"""Hugging Face models patched by nanofast against the same models unpatched, on the CPU: a training step
(forward, backward, AdamW) of each family (`pytest --benchmark -k families`).

Families: GPT-2, Llama, Qwen2 with grouped-query attention (8 heads, 2 key/value heads), Mistral with a
sliding window, BERT and ViT; random weights, 4 layers, 256 wide, B=8, T=128 (64 patches of 4x4 pixels
for ViT), with a padded batch (unequal lengths) for the text models; float32 and bfloat16 autocast. And a
fine-tuning step of a SmolLM2-135M-shaped Llama (30 layers, 576 wide, 9 heads, 3 key/value heads, MLP
1536, vocabulary 49152, B=4, T=512). The patched causal LMs run their LM head and loss fused
(nanofast.patch's fused_loss, the logits never stored).

Time: patched and unpatched take turns, round after round, in one process (a drift of the machine's
speed hits both alike). Peak memory: each variant runs two steps in a fresh subprocess, and the figure is
the growth of the process's peak resident set (VmHWM) over its size after building the model, printed
under the report's table; for a causal LM also patched with fused_loss=False, which shows what the fused
loss saves. transformers is a benchmark dependency only.
"""
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from bench_train import _alternate

transformers = pytest.importorskip("transformers")

import nanofast  # noqa: E402

B, T, WIDTH, LAYERS = 8, 128, 256, 4


def build(family):
    """(model, inputs) of one family, random weights seeded."""
    torch.manual_seed(0)
    common = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, intermediate_size=4 * WIDTH)
    text = dict(vocab_size=8192, max_position_embeddings=512, **common)
    tf = transformers
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=8192, n_positions=512, n_embd=WIDTH, n_layer=LAYERS,
                                                 n_head=8))
    elif family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_attention_heads=8, num_key_value_heads=8, **text))
    elif family == "qwen2-gqa":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_attention_heads=8, num_key_value_heads=2, **text))
    elif family == "mistral-window":
        model = tf.MistralForCausalLM(tf.MistralConfig(num_attention_heads=8, num_key_value_heads=2,
                                                       sliding_window=64, **text))
    elif family == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(num_attention_heads=8, **text))
    elif family == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=4, num_attention_heads=8,
                                                          num_labels=10, **common))
    elif family == "smollm2-135m":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                                   max_position_embeddings=2048, tie_word_embeddings=True))
    else:
        raise ValueError(family)
    return model, inputs(family)


def inputs(family):
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        return dict(pixel_values=torch.randn(B, 3, 32, 32, generator=g), labels=torch.randint(10, (B,), generator=g))
    b, t = (4, 512) if family == "smollm2-135m" else (B, T)
    vocab = 49152 if family == "smollm2-135m" else 8192
    ids = torch.randint(vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b):  # unequal lengths: right padding for BERT, left padding for the decoders
        pad = (i * t) // (2 * b)
        if family == "bert":
            mask[i, t - pad:] = 0
        else:
            mask[i, :pad] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100))


def step_fn(model, batch, dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


_MEMORY = textwrap.dedent('''
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    import bench_families as bf, nanofast
    family, patched, dtype = sys.argv[2], sys.argv[3] != "0", getattr(torch, sys.argv[4])
    model, batch = bf.build(family)
    if patched:
        nanofast.patch(model, fused_loss=sys.argv[3] == "fused")
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
    before = status("VmRSS:")
    step = bf.step_fn(model, batch, dtype)
    for _ in range(2):
        step()
    print(json.dumps(dict(peak_mb=status("VmHWM:") - before)))
''')


def peak_memory_mb(family, patched, dtype, fused_loss=True):
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    # run from bench/: from the repository root, its kernels/ directory would shadow the `kernels` package
    # transformers imports (see the root conftest.py)
    variant = ("fused" if fused_loss else "1") if patched else "0"
    r = subprocess.run([sys.executable, "-c", _MEMORY, here, family, variant,
                        str(dtype).replace("torch.", "")], capture_output=True, text=True, timeout=1800, cwd=here)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]


FAMILIES = ["gpt2", "llama", "qwen2-gqa", "mistral-window", "bert", "vit", "smollm2-135m"]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES, ids=[f"families-{f}" for f in FAMILIES])
def test_family_train_step(record, family, dtype):
    ref, batch = build(family)
    model = nanofast.patch(copy.deepcopy(ref))
    fused = nanofast.patch_loss.fuses_loss(model)
    steps = {"torch": step_fn(ref, batch, dtype), "nanofast": step_fn(model, batch, dtype)}
    times, rounds = _alternate(steps, seconds_per_round=0.5)
    tokens = batch["input_ids"].numel() if "input_ids" in batch else B * 64
    case = f"{family} B{len(next(iter(batch.values())))}" + (" padded" if "attention_mask" in batch else "") + \
        (" fused loss" if fused else "")
    for provider, seconds in times.items():
        record.seconds(seconds, rounds, op="train step (HF family)", case=case, mode="fwd+bwd+AdamW", dtype=dtype,
                       provider=provider, device="cpu", work=tokens * 1e6, unit="ktok/s")
    peaks = {p: peak_memory_mb(family, p == "nanofast", dtype) for p in ("torch", "nanofast")}
    unfused = f", patched without the fused loss {peak_memory_mb(family, True, dtype, fused_loss=False):.0f} MB" \
        if fused else ""
    record.note(f"peak memory, train step {case} {str(dtype).replace('torch.', '')}: patched "
                f"{peaks['nanofast']:.0f} MB{unfused}, unpatched {peaks['torch']:.0f} MB (growth of VmHWM over the "
                "built model)")
