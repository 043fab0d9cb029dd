"""The pieces of a training run that nanofast-train and nanofast-compare share, in the order a run
uses them:

    where it runs       resolve_device, resolve_dtype, device_type_of, precision_error
    how it computes     Precision / precision(): the autocast context, the GradScaler, TF32
    the model           model_args, init_model (scratch, resume or GPT-2), build_optimizer,
                        describe_optimizer
    one step            train_step: the micro-batches' forward and backward passes (gradient
                        accumulation), then optimizer_step: unscale, clip, AdamW, zero_grad
    the schedule        get_lr: nanoGPT's warmup and cosine decay
    evaluation          estimate_loss

Each function returns what it made and prints nothing; the commands decide what to tell the user.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nanofast import optim as nanofast_optim
from nanofast.checkpoint import CKPT_NAME, CheckpointError, load_checkpoint
from nanofast.configurator import ConfigError
from nanofast.data import BatchSampler, DataError
from nanofast.model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# where it runs


def has_mps() -> bool:
    return getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()


def resolve_device(device):
    """'auto' -> cuda, then mps, then cpu; a device that is not there is a ConfigError."""
    if device != 'auto':
        if device.startswith('cuda') and not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}, but CUDA is not available here; use --device=cpu (or auto)")
        if device.startswith('mps') and not has_mps():
            raise ConfigError(f"device={device!r}, but MPS is not available here; use --device=cpu (or auto)")
        return device
    if torch.cuda.is_available():
        return 'cuda'
    return 'mps' if has_mps() else 'cpu'


def device_type_of(device) -> str:
    """'cuda', 'mps' or 'cpu' for a device string such as 'cuda:1'."""
    device = str(device)
    return 'cuda' if 'cuda' in device else ('mps' if 'mps' in device else 'cpu')


def resolve_dtype(dtype, device_type):
    """'auto' -> bfloat16 on GPUs that support it, float16 on other GPUs, float32 on cpu and mps."""
    if dtype != 'auto':
        return dtype
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'


def precision_error(dtype, device_type, kernels):
    """Why `dtype` cannot run on `device_type` with `kernels`, or None where it can."""
    if dtype == 'float16' and device_type == 'cpu' and kernels == 'nanofast':
        return "float16 on the CPU: nanofast's CPU kernels take float32 and bfloat16"
    return None


# -----------------------------------------------------------------------------
# how it computes

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def enable_tf32():
    """TF32 matmuls and convolutions on Ampere and later GPUs, as nanoGPT's train.py sets them."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


@dataclass
class Precision:
    """The arithmetic of a run: `ctx` autocasts to `ptdtype` (a no-op for float32), and `scaler`
    scales the loss for float16 (for other dtypes it passes everything through unchanged)."""
    dtype: str
    ptdtype: torch.dtype
    ctx: object
    scaler: torch.amp.GradScaler


def precision(dtype, device_type) -> Precision:
    """The Precision of a resolved dtype ('float32', 'bfloat16', 'float16') on a device type; turns TF32 on."""
    enable_tf32()
    ptdtype = DTYPES[dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.amp.autocast(device_type=device_type, dtype=ptdtype)
    return Precision(dtype, ptdtype, ctx, torch.amp.GradScaler(device_type, enabled=(dtype == 'float16')))


# -----------------------------------------------------------------------------
# the model and its optimizer

SHAPE_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size')
GPT2_VOCAB = 50304  # GPT-2's 50257 tokens rounded up to a multiple of 64


def model_args(c, vocab_size=None) -> dict:
    """nanoGPT's model_args (GPTConfig's fields) for the configuration `c`."""
    return dict(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], block_size=c['block_size'],
                bias=c['bias'], vocab_size=vocab_size, dropout=c['dropout'])


@dataclass
class ModelStart:
    """Where training starts: the model (on the CPU), its model_args, and for a resumed run the
    checkpoint it came from with its iteration and best validation loss."""
    model: GPT
    model_args: dict
    checkpoint: dict | None = None
    iter_num: int = 0
    best_val_loss: float = 1e9


def init_model(c, meta_vocab_size=None, log=lambda msg: None, meta=None) -> ModelStart:
    """The model c['init_from'] asks for: 'scratch' (from torch's current random state), 'resume'
    (out_dir/ckpt.pt; the shape from the checkpoint, dropout from `c`) or a GPT-2 model. A
    block_size smaller than the loaded model's crops the position embeddings. log(msg) hears what
    nanoGPT's train.py prints on the way. A resumed run must ask for the checkpoint's shape (or a
    smaller block_size) and, where `meta` (the dataset's meta.pkl) is given, train on its vocabulary:
    a ConfigError says what differs."""
    args = model_args(c)
    if c['init_from'] == 'scratch':
        log("Initializing a new model from scratch")
        if meta_vocab_size is None:
            log(f"defaulting to vocab_size of GPT-2 to {GPT2_VOCAB} (50257 rounded up for efficiency)")
        args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else GPT2_VOCAB
        start = ModelStart(GPT(GPTConfig(**args, kernels=c['kernels'])), args)
    elif c['init_from'] == 'resume':
        ckpt_path = os.path.join(c['out_dir'], CKPT_NAME)
        log(f"Resuming training from {ckpt_path}")
        checkpoint = _load_run_checkpoint(ckpt_path, c['out_dir'])
        check_resume(checkpoint, c, ckpt_path, meta, log)
        args.update({k: checkpoint['model_args'][k] for k in SHAPE_ARGS})
        model = GPT(GPTConfig(**args, kernels=c['kernels']))
        model.load_nanogpt_state_dict(checkpoint['model'])
        start = ModelStart(model, args, checkpoint, int(checkpoint['iter_num']),
                           float(checkpoint['best_val_loss']))
    else:
        log(f"Initializing from OpenAI GPT-2 weights: {c['init_from']}")
        model = _gpt2(c)
        args.update({k: getattr(model.config, k) for k in SHAPE_ARGS})
        start = ModelStart(model, args)
    model = start.model
    if c['block_size'] < model.config.block_size:
        model.crop_block_size(c['block_size'])
        start.model_args['block_size'] = c['block_size']
    if meta_vocab_size is not None and model.config.vocab_size < meta_vocab_size:
        raise DataError(f"the model's vocab_size ({model.config.vocab_size}) is smaller than the dataset's "
                        f"({meta_vocab_size})")
    return start


def check_resume(checkpoint, c, path, meta=None, log=lambda msg: None):
    """ConfigError where the configuration asks for what resuming `checkpoint` cannot honour: another
    model shape (a smaller block_size is honoured, by cropping) or, with the dataset's `meta`, another
    vocabulary. A different dataset with the same vocabulary is a note."""
    ck = checkpoint['model_args']
    differ = [k for k in ('n_layer', 'n_head', 'n_embd', 'bias') if k in ck and c[k] != ck[k]]
    if c['block_size'] > ck['block_size']:
        differ.append('block_size')
    if differ:
        raise ConfigError(
            f"--init_from=resume continues the model in {path} ({', '.join(f'{k}={ck[k]}' for k in differ)}), but "
            f"the configuration asks for {', '.join(f'{k}={c[k]}' for k in differ)}; give the run's own settings "
            f"(its config file), or start a new run in another out_dir"
            + (" (a smaller block_size crops the model)" if 'block_size' in differ else ""))
    if meta is None:
        return
    ours = (checkpoint.get('meta') or {}).get('itos')
    theirs = meta.get('itos')
    same_vocab = ({int(k): v for k, v in ours.items()} == {int(k): v for k, v in theirs.items()}
                  if isinstance(ours, dict) and isinstance(theirs, dict) else meta.get('vocab_size') == ck['vocab_size'])
    if not same_vocab:
        size = len(ours) if isinstance(ours, dict) else ck['vocab_size']
        raise ConfigError(f"--init_from=resume: the dataset's vocabulary ({meta.get('vocab_size')} tokens) is not the "
                          f"one the model in {path} was trained on ({size} tokens), so its token ids would mean "
                          f"other characters; resume with the run's dataset, or start a new run in another out_dir")
    was = (checkpoint.get('config') or {}).get('dataset')
    if was and was != c['dataset']:
        log(f"note: resuming on dataset {c['dataset']!r}; the checkpoint was trained on {was!r} (same vocabulary)")


def _gpt2(c):
    """GPT.from_pretrained, with a one-line error where the weights cannot be had (no transformers
    package, no network and no cached copy)."""
    try:
        return GPT.from_pretrained(c['init_from'], dict(dropout=c['dropout']), kernels=c['kernels'])
    except ImportError as e:
        raise ConfigError(str(e)) from None
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot load the GPT-2 weights {c['init_from']!r}: {first} (init_from=gpt2 downloads "
                              f"them through huggingface transformers: it needs network access or a cached copy)") from None


def _load_run_checkpoint(path, out_dir):
    try:
        return load_checkpoint(path, map_location='cpu')
    except CheckpointError as e:
        if not os.path.exists(path):
            raise CheckpointError(f"{e}: --init_from=resume continues the run saved in out_dir "
                                  f"(--out_dir={out_dir}); start one with --init_from=scratch") from None
        raise


def build_optimizer(model, c, device_type):
    """The model's AdamW (GPT.configure_optimizers) with the configuration's hyperparameters."""
    return model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']), device_type)


def describe_optimizer(optimizer) -> list:
    """What nanoGPT's configure_optimizers prints, read off the optimizer it built: the decayed and
    non-decayed parameters, and which AdamW implementation steps them."""
    decay, no_decay = optimizer.param_groups[:2]
    lines = [f"num {kind} parameter tensors: {len(g['params'])}, with {sum(p.numel() for p in g['params']):,} parameters"
             for kind, g in (('decayed', decay), ('non-decayed', no_decay))]
    if isinstance(optimizer, nanofast_optim.AdamW):
        lines.append("using fused AdamW: nanofast (C++, with the gradient clip)")
    else:
        lines.append(f"using fused AdamW: {bool(optimizer.defaults.get('fused'))}")
    return lines


# -----------------------------------------------------------------------------
# one training step


def train_step(model, optimizer, prec: Precision, get_batch, n_micro, grad_clip, lr, check=None, before_update=None):
    """One optimizer step at learning rate `lr` over `n_micro` micro-batches, get_batch(i) -> (X, Y):
    each micro-batch's loss / n_micro is backpropagated, so the accumulated gradient is their mean
    (under DDP, all-reduced once, after the last). The next micro-batch is fetched while the device
    still runs the forward pass. check() runs before each micro-batch (it may raise), before_update()
    once before the weights change. Returns (mean loss as a float32 device tensor, gradient norm
    before clipping or None)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    ddp = isinstance(model, DistributedDataParallel)
    X, Y = get_batch(0)
    loss_sum = torch.zeros((), device=X.device, dtype=torch.float32)
    for micro_step in range(n_micro):
        if check is not None:
            check()
        if ddp:
            model.require_backward_grad_sync = (micro_step == n_micro - 1)
        if X.is_cuda:
            # a new step for compile's CUDA graphs (mode 'reduce-overhead'; nothing otherwise): the
            # last replay's outputs are no longer needed
            torch.compiler.cudagraph_mark_step_begin()
        with prec.ctx:
            _, loss = model(X, Y)
            loss = loss / n_micro
        if micro_step + 1 < n_micro:
            X, Y = get_batch(micro_step + 1)
        with backward_threads(X):
            prec.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    if before_update is not None:
        before_update()
    return loss_sum, optimizer_step(model, optimizer, prec.scaler, grad_clip)


def backward_threads(x):
    """Where autograd runs a backward pass: on the calling thread for CUDA tensors, instead of handing
    it to autograd's device thread and waiting. The hand-off costs more host time per step than a small
    model's kernels take on a fast GPU (bench/gpu_train_bench.py measures both ways)."""
    if x.is_cuda:
        return torch.autograd.set_multithreading_enabled(False)
    return nullcontext()


def optimizer_step(model, optimizer, scaler, grad_clip):
    """The end of a training step, after the micro-batches' backward passes: unscale (float16), clip
    the gradient norm, step AdamW, clear the gradients. Returns the norm before clipping (or None).
    nanofast.optim.AdamW clips and steps in one call."""
    norm = None
    if isinstance(optimizer, nanofast_optim.AdamW) and not scaler.is_enabled():
        norm = optimizer.step(max_grad_norm=grad_clip if grad_clip != 0.0 else None)
        optimizer.zero_grad(set_to_none=True)
        return norm
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


# -----------------------------------------------------------------------------
# the learning-rate schedule


def get_lr(it, c):
    """The learning rate at iteration `it`: a linear ramp over warmup_iters (starting above zero), then
    half a cosine from learning_rate down to min_lr at lr_decay_iters, then min_lr (nanoGPT's schedule).
    A constant learning_rate where decay_lr is False."""
    if not c.get('decay_lr', True):
        return c['learning_rate']
    if it < c['warmup_iters']:
        return c['learning_rate'] * (it + 1) / (c['warmup_iters'] + 1)
    if it > c['lr_decay_iters']:
        return c['min_lr']
    progress = (it - c['warmup_iters']) / (c['lr_decay_iters'] - c['warmup_iters'])  # 0 -> 1
    assert 0.0 <= progress <= 1.0
    return c['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c['learning_rate'] - c['min_lr'])


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def estimate_loss(model, bins, c, ctx, device, rank=0, world_size=1, check=None):
    """Mean loss over c['eval_iters'] batches of each split ('train', 'val' in `bins`: paths of .bin
    files). The batches are the same at every evaluation (a generator seeded for each split); with
    several processes each takes its share and the sums are all-reduced."""
    out = {}
    model.eval()
    for i, split in enumerate(['train', 'val']):
        sampler = BatchSampler(bins[split], c['block_size'], seed=c['seed'] + 1_000_003 * (i + 1), device=device)
        offsets = sampler.draw(c['eval_iters'] * c['batch_size']).view(c['eval_iters'], c['batch_size'])
        total = torch.zeros((), device=device, dtype=torch.float32)
        for k in range(rank, c['eval_iters'], world_size):
            if check is not None:
                check()
            X, Y = sampler.batch(offsets[k])
            with ctx:
                _, loss = model(X, Y)
            total += loss.float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        out[split] = total.item() / c['eval_iters']
    model.train()
    return out
