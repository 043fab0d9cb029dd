"""
nanofast-train: train a GPT the way nanoGPT's train.py does, with nanofast's kernels.

    nanofast-train                            # small model, offline default corpus, minutes on a CPU
    nanofast-train config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
    nanofast-train config/train_shakespeare_char.py --init_from=resume     # continue a run
    torchrun --standalone --nproc_per_node=4 -m nanofast.train config/train_shakespeare_char.py

Configuration follows nanoGPT (nanofast/configurator.py): optional config files, then --key=value
overrides, with train.py's keys and defaults (DEFAULTS below). Without a config file,
nanofast/config/train_default.py is applied first, so that no arguments at all train a small model
on the offline default corpus; config/train_gpt2.py restates nanoGPT's own defaults.

Beyond nanoGPT:
- device='auto' (cuda, then mps, then cpu) and dtype='auto' (bfloat16 where the GPU supports it,
  float16 with a GradScaler on other GPUs, float32 on the CPU and mps; --dtype=bfloat16 turns on
  bfloat16 autocast on the CPU)
- kernels='nanofast' | 'torch' selects who runs LayerNorm (with the residual adds), attention, GELU and,
  on the CPU, the AdamW step
- retain_memory=True: CPU runs keep freed memory in the process instead of page-faulting every
  step's tensors back in (nanofast/allocator.py; 10-25% of a CPU step on the dev machine)
- datasets are prepared on first use (nanofast/data.py; keys data_dir and data_path)
- batches come from a seeded generator of their own; every process draws the same offsets and takes
  its share, so a run's data do not depend on the number of processes
- out_dir/ckpt.pt is written atomically and holds every random state and the sampler's, so
  --init_from=resume continues exactly as the uninterrupted run would have on the same device.
  Ctrl-C (or SIGTERM) saves a checkpoint and exits with status 130 (where ckpt.pt held the best model
  of an always_save_checkpoint=False run, that file is kept as ckpt_best.pt first). Besides
  nanoGPT's saves at evaluations, the final state is saved at the end when always_save_checkpoint is
  True, or when the run saved nothing else (so a short run is never lost)
- a progress bar with ETA; per-iteration loss, time, tokens/s and MFU (against this device's measured
  matmul peak); out_dir/metrics.jsonl; out_dir/loss.png redrawn at each evaluation
- the logged loss is the mean over the iteration's micro-batches (and processes); nanoGPT logs the
  last micro-batch's
"""

import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch

from nanofast import optim as nanofast_optim
from nanofast.allocator import retain_freed_memory
from nanofast.checkpoint import (FORMAT, VERSION, CheckpointError, capture_rng_state, load_checkpoint,
                                 restore_rng_state, rng_state_for_checkpoint, save_checkpoint)
from nanofast.configurator import ConfigError, configure, run_cli
from nanofast.data import BatchSampler, DataError, load_meta, prepare_dataset
from nanofast.model import GPT, KERNELS, NANOGPT_MODEL_ARGS, GPTConfig

# -----------------------------------------------------------------------------
# The keys of nanoGPT's train.py with its defaults (which describe GPT-2 124M on OpenWebText over
# 8 GPUs), plus a few of nanofast's at the end. Without a config file on the command line,
# config/train_default.py is applied on top of these first.
DEFAULTS = dict(
    # output, evaluation, checkpoints
    out_dir='out',  # checkpoint, metrics.jsonl and loss.png go here
    eval_interval=2000,  # evaluate (and maybe checkpoint) every this many iterations
    log_interval=1,  # print and record the training loss every this many iterations
    eval_iters=200,  # batches per split in each evaluation
    eval_only=False,  # evaluate once, then stop
    always_save_checkpoint=True,  # save at every evaluation; False: only when val loss improves
    init_from='scratch',  # 'scratch', 'resume' (out_dir/ckpt.pt) or 'gpt2', 'gpt2-medium', ...
    # Weights & Biases
    wandb_log=False,
    wandb_project='owt',
    wandb_run_name='gpt2',
    # data
    dataset='openwebtext',  # a name (see nanofast.data) or a path to a UTF-8 text file
    gradient_accumulation_steps=5 * 8,  # micro-batches per optimizer step, over all processes
    batch_size=12,  # sequences per micro-batch
    block_size=1024,  # tokens per sequence
    # model
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,
    bias=False,  # biases in Linear and LayerNorm layers
    # AdamW
    learning_rate=6e-4,  # the peak learning rate
    max_iters=600000,  # the last iteration trained (so max_iters + 1 steps from scratch)
    weight_decay=1e-1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # clip the gradient norm to this; 0.0 disables clipping
    # learning rate schedule: linear warmup, then cosine decay to min_lr
    decay_lr=True,  # False: a constant learning_rate
    warmup_iters=2000,
    lr_decay_iters=600000,  # where the cosine reaches min_lr (usually max_iters)
    min_lr=6e-5,  # usually learning_rate / 10
    # distributed (torchrun)
    backend='nccl',  # torch.distributed backend on CUDA; the CPU always uses gloo
    # system
    device='auto',  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype='auto',  # 'auto', 'float32', 'bfloat16' or 'float16' (float16 adds a GradScaler)
    compile=True,  # torch.compile the model
    # nanofast's own
    kernels='nanofast',  # 'nanofast' or 'torch': who runs LayerNorm (+ residual adds), attention, GELU, CPU AdamW
    data_dir='',  # root of the prepared datasets ('' = see nanofast.data: ./data/<name> or ~/.cache/nanofast/data)
    data_path='',  # a UTF-8 text file to train on (for shakespeare_char: a local copy of input.txt)
    seed=1337,  # seeds the initialisation, dropout (plus the DDP rank) and the batch sampler
    peak_flops=0.0,  # FLOP/s that MFU is relative to; 0 = this device's measured matmul peak
    retain_memory=True,  # CPU runs: keep freed memory rather than page-fault it back each step (nanofast.allocator)
)
DEFAULT_CONFIG_FILE = 'train_default.py'
# -----------------------------------------------------------------------------


def _is_master_env():
    return os.environ.get('RANK', '0') == '0'


def get_config(argv):
    """The training configuration for command-line arguments `argv` (nanoGPT's configurator)."""
    config = configure(DEFAULTS, list(argv), default_config_file=DEFAULT_CONFIG_FILE,
                       verbose=_is_master_env(), prog='nanofast-train',
                       doc=__doc__.split('\n\n')[0].strip() + '\nWithout a config file, config/' + DEFAULT_CONFIG_FILE
                       + ' is applied first (a small model on the offline default corpus).')
    validate_config(config)
    return config


def validate_config(c):
    """Values that have the right type but cannot work: a ConfigError saying which and why."""
    def bad(msg):
        raise ConfigError(msg)
    for k in ('eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps', 'batch_size',
              'block_size', 'n_layer', 'n_head', 'n_embd'):
        if c[k] <= 0:
            bad(f"{k} must be positive, got {c[k]}")
    if c['max_iters'] < 0:
        bad(f"max_iters must be >= 0, got {c['max_iters']}")
    if c['n_embd'] % c['n_head'] != 0:
        bad(f"n_embd ({c['n_embd']}) must be a multiple of n_head ({c['n_head']})")
    if not 0.0 <= c['dropout'] < 1.0:
        bad(f"dropout must be in [0, 1), got {c['dropout']}")
    if c['init_from'] not in ('scratch', 'resume') and not c['init_from'].startswith('gpt2'):
        bad(f"init_from must be 'scratch', 'resume' or a GPT-2 model (gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
            f"got {c['init_from']!r}")
    if c['kernels'] not in KERNELS:
        bad(f"kernels must be one of {KERNELS}, got {c['kernels']!r}")
    if c['dtype'] not in ('auto', 'float32', 'bfloat16', 'float16'):
        bad(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {c['dtype']!r}")
    dev = c['device']
    if dev != 'auto':
        try:
            torch.device(dev)
        except (RuntimeError, ValueError):
            bad(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {dev!r}")
    if c['decay_lr'] and c['lr_decay_iters'] <= c['warmup_iters'] and c['max_iters'] > c['warmup_iters']:
        bad(f"lr_decay_iters ({c['lr_decay_iters']}) must be larger than warmup_iters ({c['warmup_iters']})")


def resolve_device(device):
    """'auto' -> cuda, then mps, then cpu; a device that is not there is a ConfigError."""
    if device != 'auto':
        if device.startswith('cuda') and not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}, but CUDA is not available here; use --device=cpu (or auto)")
        if device.startswith('mps') and not (getattr(torch.backends, 'mps', None) is not None
                                             and torch.backends.mps.is_available()):
            raise ConfigError(f"device={device!r}, but MPS is not available here; use --device=cpu (or auto)")
        return device
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def resolve_dtype(dtype, device_type):
    """'auto' -> bfloat16 on GPUs that support it, float16 on other GPUs, float32 on cpu and mps."""
    if dtype != 'auto':
        return dtype
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'


def get_lr(it, c):
    """The learning rate at iteration `it`: a linear ramp over warmup_iters (starting above zero), then
    half a cosine from learning_rate down to min_lr at lr_decay_iters, then min_lr (nanoGPT's schedule)."""
    if it < c['warmup_iters']:
        return c['learning_rate'] * (it + 1) / (c['warmup_iters'] + 1)
    if it > c['lr_decay_iters']:
        return c['min_lr']
    progress = (it - c['warmup_iters']) / (c['lr_decay_iters'] - c['warmup_iters'])  # 0 -> 1
    assert 0.0 <= progress <= 1.0
    return c['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c['learning_rate'] - c['min_lr'])


def _fmt_secs(s):
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"



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


class _Interrupts:
    """Ctrl-C and SIGTERM.

    During the training loop (`deferring`), the first signal only records the request; the loop calls
    check() at safe points (each iteration's start, each micro-step, each evaluation batch), which
    raises KeyboardInterrupt there. So a checkpoint never sees a half-updated model, and the request
    cannot get lost (Python drops an exception raised by a signal handler that happens to run inside a
    weakref callback or __del__). A second signal more than 2 seconds after the first raises at once
    (one sooner is taken for the same request delivered twice, as torchrun forwards the terminal's
    Ctrl-C to workers that got it already); so does any signal during setup.
    """

    def __init__(self):
        self.deferring = False
        self.requested = None
        self.requested_at = 0.0
        self.in_step = False  # inside the optimizer step: the model may be half-updated
        self._old = {}

    def _handler(self, signum, frame):
        if self.deferring:
            if self.requested is None:
                self.requested, self.requested_at = signum, time.monotonic()
                return
            if time.monotonic() - self.requested_at < 2.0:
                return
        raise KeyboardInterrupt

    def check(self):
        if self.requested is not None:
            raise KeyboardInterrupt

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):
                pass
        return self

    def uninstall(self):
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass
        self._old = {}


def run(config):
    """Train with `config` (a dict of DEFAULTS' keys). Returns a summary dict:
    iter_num, best_val_loss, losses [(iter, loss)], evals [(iter, train_loss, val_loss)],
    step_ms [(iter, ms)], interrupted, out_dir, ckpt_path."""
    c = dict(DEFAULTS)
    c.update(config)
    validate_config(c)
    interrupts = _Interrupts().install()
    try:
        return _Trainer(c, interrupts).train()
    finally:
        interrupts.uninstall()


class _Trainer:

    def __init__(self, c, interrupts):
        self.c = c
        self.interrupts = interrupts
        self.result = dict(iter_num=0, best_val_loss=None, losses=[], evals=[], step_ms=[], interrupted=False,
                           out_dir=c['out_dir'], ckpt_path=os.path.join(c['out_dir'], 'ckpt.pt'))
        self._setup_distributed()
        try:
            self._setup()
        except BaseException:
            self._teardown_distributed()
            raise

    # -------------------------------------------------------------------------------------------
    # setup

    def _setup_distributed(self):
        c = self.c
        import torch.distributed as dist
        self.dist = dist
        self.ddp = int(os.environ.get('RANK', -1)) != -1  # launched by torchrun
        device = resolve_device(c['device'])
        if self.ddp:
            self.ddp_rank = int(os.environ['RANK'])
            self.ddp_local_rank = int(os.environ.get('LOCAL_RANK', self.ddp_rank))
            self.ddp_world_size = int(os.environ['WORLD_SIZE'])
            if device.startswith('cuda'):
                device = f'cuda:{self.ddp_local_rank}'
                torch.cuda.set_device(device)
                backend = c['backend']
            else:
                backend = 'gloo' if c['backend'] == 'nccl' else c['backend']
            dist.init_process_group(backend=backend)
            self.master_process = self.ddp_rank == 0  # rank 0 prints, logs and writes checkpoints
            seed_offset = self.ddp_rank  # different dropout on each rank
            # gradient_accumulation_steps counts micro-batches over all processes: each does its share
            if c['gradient_accumulation_steps'] % self.ddp_world_size != 0:
                dist.destroy_process_group()
                raise ConfigError(f"gradient_accumulation_steps ({c['gradient_accumulation_steps']}) must be a "
                                  f"multiple of the number of processes ({self.ddp_world_size})")
        else:
            self.ddp_rank, self.ddp_local_rank, self.ddp_world_size = 0, 0, 1
            self.master_process = True
            seed_offset = 0
        self.device = device
        self.seed_offset = seed_offset
        self.grad_accum = c['gradient_accumulation_steps'] // self.ddp_world_size  # micro-batches of this process

    def _teardown_distributed(self):
        if self.ddp and self.dist.is_initialized():
            self.dist.destroy_process_group()

    def print(self, *a, **k):
        if self.master_process:
            if getattr(self, 'bar', None) is not None and not self.bar.disable:
                self.bar.write(' '.join(str(x) for x in a))
            else:
                print(*a, flush=True, **k)

    def _setup(self):
        c = self.c
        device = self.device
        self.device_type = 'cuda' if 'cuda' in device else ('mps' if 'mps' in device else 'cpu')
        self.dtype = resolve_dtype(c['dtype'], self.device_type)
        if self.dtype == 'float16' and self.device_type == 'cpu' and c['kernels'] == 'nanofast':
            raise ConfigError("dtype=float16 on the CPU: nanofast's CPU kernels take float32 and bfloat16; "
                              "use --dtype=bfloat16 (or --kernels=torch)")
        tokens_per_iter = self.grad_accum * self.ddp_world_size * c['batch_size'] * c['block_size']
        self.tokens_per_iter = tokens_per_iter
        self.print(f"device: {device}, dtype: {self.dtype}, kernels: {c['kernels']}"
                   + (f", DDP world size {self.ddp_world_size}" if self.ddp else ""))
        self.print(f"tokens per iteration will be: {tokens_per_iter:,}")

        if self.master_process:
            os.makedirs(c['out_dir'], exist_ok=True)
        if self.device_type == 'cpu' and c['retain_memory']:
            retain_freed_memory()
        torch.manual_seed(c['seed'] + self.seed_offset)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
        ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[self.dtype]
        self.ptdtype = ptdtype
        self.ctx = nullcontext() if ptdtype == torch.float32 else torch.amp.autocast(device_type=self.device_type, dtype=ptdtype)

        # data: prepared once (by one process per node), then memmapped
        if self.ddp_local_rank == 0:
            self.data_dir = prepare_dataset(c['dataset'], c['data_dir'], c['data_path'], verbose=self.master_process)
        if self.ddp:
            self.dist.barrier()
            if self.ddp_local_rank != 0:
                self.data_dir = prepare_dataset(c['dataset'], c['data_dir'], c['data_path'], verbose=False)
        self.print(f"data: {self.data_dir}")
        self.bins = {s: os.path.join(self.data_dir, f'{s}.bin') for s in ('train', 'val')}
        # every rank draws the same offsets from the same generator and takes its share of them
        self.sampler = BatchSampler(self.bins['train'], c['block_size'], seed=c['seed'], device=device)
        BatchSampler(self.bins['val'], c['block_size'], seed=0)  # fails clearly if val is shorter than a block
        meta = load_meta(self.data_dir)
        self.meta = meta
        meta_vocab_size = meta['vocab_size'] if meta is not None else None
        if meta_vocab_size is not None:
            self.print(f"found vocab_size = {meta_vocab_size} (inside {os.path.join(self.data_dir, 'meta.pkl')})")

        # the model
        model_args = dict(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], block_size=c['block_size'],
                          bias=c['bias'], vocab_size=None, dropout=c['dropout'])
        checkpoint = None
        if c['init_from'] == 'scratch':
            self.print("Initializing a new model from scratch")
            if meta_vocab_size is None:
                self.print("defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)")
            model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
            model = GPT(GPTConfig(**model_args, kernels=c['kernels']))
            self.iter_num = 0
            self.best_val_loss = 1e9
        elif c['init_from'] == 'resume':
            ckpt_path = os.path.join(c['out_dir'], 'ckpt.pt')
            self.print(f"Resuming training from {ckpt_path}")
            try:
                checkpoint = load_checkpoint(ckpt_path, map_location='cpu')
            except CheckpointError as e:
                if not os.path.exists(ckpt_path):
                    raise CheckpointError(f"{e}: --init_from=resume continues the run saved in out_dir "
                                          f"(--out_dir={c['out_dir']}); start one with --init_from=scratch") from None
                raise
            checkpoint_model_args = checkpoint['model_args']
            # the shape of the network comes from the checkpoint; dropout from the command line
            for k in ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size']:
                model_args[k] = checkpoint_model_args[k]
            model = GPT(GPTConfig(**model_args, kernels=c['kernels']))
            model.load_nanogpt_state_dict(checkpoint['model'])
            self.iter_num = int(checkpoint['iter_num'])
            self.best_val_loss = float(checkpoint['best_val_loss'])
        else:
            self.print(f"Initializing from OpenAI GPT-2 weights: {c['init_from']}")
            model = GPT.from_pretrained(c['init_from'], dict(dropout=c['dropout']), kernels=c['kernels'])
            for k in ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size']:
                model_args[k] = getattr(model.config, k)
            self.iter_num = 0
            self.best_val_loss = 1e9
        # a smaller block_size than the loaded model's: drop the extra position embeddings
        if c['block_size'] < model.config.block_size:
            model.crop_block_size(c['block_size'])
            model_args['block_size'] = c['block_size']
        if meta_vocab_size is not None and model.config.vocab_size < meta_vocab_size:
            raise DataError(f"the model's vocab_size ({model.config.vocab_size}) is smaller than the dataset's "
                            f"({meta_vocab_size})")
        self.model_args = {k: model_args[k] for k in NANOGPT_MODEL_ARGS}
        self.print("number of parameters: %.2fM" % (model.get_num_params() / 1e6,))
        model.to(device)
        self.raw_model = model  # the plain module: its state_dict has nanoGPT's keys

        # float16 needs loss scaling; for other dtypes the scaler does nothing
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=(self.dtype == 'float16'))
        if self.master_process:
            self.optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'],
                                                        (c['beta1'], c['beta2']), self.device_type)
        else:
            import contextlib
            import io
            with contextlib.redirect_stdout(io.StringIO()):
                self.optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'],
                                                            (c['beta1'], c['beta2']), self.device_type)
        self.start_iter = self.iter_num
        # why the file now at out_dir/ckpt.pt was written: 'eval' (nanoGPT's save at an evaluation),
        # 'end' or 'interrupt'; None if unknown
        self.ckpt_reason = checkpoint.get('reason') if checkpoint is not None else None
        self.resume_rng = None
        if checkpoint is not None:
            flags = [{k: g[k] for k in ('fused', 'foreach', 'capturable') if k in g} for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(checkpoint['optimizer'])
            for g, f in zip(self.optimizer.param_groups, flags):
                g.update(f)  # keep this device's implementation choice
            if checkpoint.get('scaler') and self.scaler.is_enabled():
                self.scaler.load_state_dict(checkpoint['scaler'])
            per_rank = checkpoint.get('rng_per_rank') or [checkpoint.get('rng')]
            if self.ddp_rank < len(per_rank) and per_rank[self.ddp_rank] is not None:
                self.resume_rng = per_rank[self.ddp_rank]
            else:
                # no state recorded for this rank: the data order still continues (the sampler's state
                # is the same on every rank); dropout gets a fresh seed
                self.print("note: the checkpoint has no random states for this process (a nanoGPT checkpoint, or a "
                           "different number of processes); dropout is reseeded")
                torch.manual_seed(c['seed'] + self.seed_offset + 7919 * self.iter_num)
                if per_rank and per_rank[0] is not None and per_rank[0].get('sampler') is not None:
                    self.sampler.load_state_dict(per_rank[0]['sampler'])
        checkpoint = None  # release its tensors

        self.model = model
        if c['compile']:
            self.print("compiling the model... (takes a ~minute)")
            self.model = torch.compile(model)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.model, device_ids=[self.ddp_local_rank] if self.device_type == 'cuda' else None)
        self.eval_model = self.model.module if self.ddp else self.model

        # logging
        self.peak = None
        if self.master_process:
            self.peak = c['peak_flops'] if c['peak_flops'] > 0 else None
            from nanofast.metrics import MetricsLog
            self.metrics = MetricsLog(os.path.join(c['out_dir'], 'metrics.jsonl'), truncate_from_iter=self.iter_num)
            if c['wandb_log']:
                try:
                    import wandb
                except ImportError:
                    raise ConfigError("wandb_log=True needs the wandb package (pip install wandb)") from None
                wandb.init(project=c['wandb_project'], name=c['wandb_run_name'], config=c)
        self.bar = None
        self.stop_agreed = False  # DDP: all ranks agreed to stop at an iteration boundary

    # -------------------------------------------------------------------------------------------
    # evaluation, checkpoints

    @torch.no_grad()
    def estimate_loss(self):
        """Mean loss over eval_iters batches per split. The batches are the same at every evaluation
        (a generator seeded for each split) and are shared out among the DDP ranks."""
        c = self.c
        out = {}
        self.eval_model.eval()
        for i, split in enumerate(['train', 'val']):
            sampler = BatchSampler(self.bins[split], c['block_size'], seed=c['seed'] + 1_000_003 * (i + 1), device=self.device)
            offsets = sampler.draw(c['eval_iters'] * c['batch_size']).view(c['eval_iters'], c['batch_size'])
            total = torch.zeros((), device=self.device, dtype=torch.float32)
            for k in range(self.ddp_rank, c['eval_iters'], self.ddp_world_size):
                self._check_interrupt()
                X, Y = sampler.batch(offsets[k])
                with self.ctx:
                    logits, loss = self.eval_model(X, Y)
                total += loss.float()
            if self.ddp:
                self.dist.all_reduce(total)
            out[split] = total.item() / c['eval_iters']
        self.eval_model.train()
        return out

    def checkpoint_dict(self, rng, rng_per_rank, reason):
        meta = None
        if self.meta is not None and 'itos' in self.meta:
            meta = {'vocab_size': int(self.meta['vocab_size']), 'itos': {int(k): str(v) for k, v in self.meta['itos'].items()}}
        return {
            'model': self.raw_model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'model_args': dict(self.model_args),
            'iter_num': self.iter_num,
            'best_val_loss': float(self.best_val_loss),
            'config': dict(self.c),
            'rng': rng,
            'rng_per_rank': rng_per_rank,
            'scaler': self.scaler.state_dict() if self.scaler.is_enabled() else None,
            'meta': meta,
            'format': FORMAT,
            'version': VERSION,
            'reason': reason,
        }

    def save(self, rng, reason, gather=True):
        """Write out_dir/ckpt.pt atomically (master); with gather, all ranks send their random states."""
        rng = rng_state_for_checkpoint(rng)
        per_rank = [rng]
        if self.ddp:
            if gather:
                per_rank = [None] * self.ddp_world_size
                self.dist.all_gather_object(per_rank, rng)
            else:
                per_rank = [rng] + [None] * (self.ddp_world_size - 1)
        if self.master_process:
            path = self.result['ckpt_path']
            self.print(f"saving checkpoint to {self.c['out_dir']}")
            if reason == 'interrupt' and self.ckpt_reason == 'eval' and not self.c['always_save_checkpoint'] \
                    and os.path.exists(path):
                # ckpt.pt holds the best model so far (saved because val loss improved): keep it
                best = os.path.join(self.c['out_dir'], 'ckpt_best.pt')
                os.replace(path, best)
                self.print(f"kept the best checkpoint (val loss {self.best_val_loss:.4f}) as {best}")
            save_checkpoint(self.checkpoint_dict(per_rank[0], per_rank, reason), path)
            self.ckpt_reason = reason

    # -------------------------------------------------------------------------------------------
    # the training loop

    def train(self):
        try:
            return self._train()
        finally:
            if self.bar is not None:
                self.bar.close()
            self._teardown_distributed()

    def _train(self):
        c = self.c
        G, B = self.grad_accum, c['batch_size']
        G_all = G * self.ddp_world_size
        if self.iter_num > c['max_iters'] and not c['eval_only']:
            self.print(f"nothing to do: the checkpoint is at iteration {self.iter_num}, past max_iters={c['max_iters']}")
            return self._finish()
        if self.resume_rng is not None:
            for note in restore_rng_state(self.resume_rng, self.sampler):
                self.print("note: " + note)
        if self.master_process and self.peak is None:
            from nanofast.metrics import peak_flops
            self.peak = peak_flops(self.device, self.ptdtype, fallback_dir=c['out_dir'])
        if self.master_process:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=c['max_iters'] + 1, initial=self.iter_num, unit='it', dynamic_ncols=True,
                            disable=None, leave=False, file=sys.stderr)
        local_iter_num = 0  # iterations run by this process
        running_mfu = -1.0
        step_times = []
        snapshot = capture_rng_state(self.sampler, raw=True)  # the random states at the start of this iteration
        saved_at = None  # the iteration of this run's last checkpoint
        t_start = time.time()
        try:
            self.interrupts.deferring = True
            while True:
                self._check_interrupt(boundary=True)
                t0 = time.perf_counter()
                lr = get_lr(self.iter_num, c) if c['decay_lr'] else c['learning_rate']
                for param_group in self.optimizer.param_groups:
                    param_group['lr'] = lr

                # evaluation, and the checkpoint that goes with it
                if self.iter_num % c['eval_interval'] == 0:
                    losses = self.estimate_loss()
                    self.result['evals'].append((self.iter_num, losses['train'], losses['val']))
                    self.print(f"step {self.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    if self.master_process:
                        self.metrics.log({'kind': 'eval', 'iter': self.iter_num, 'train_loss': losses['train'],
                                          'val_loss': losses['val'], 'lr': lr, 'time': time.time()})
                        self._plot()
                        if c['wandb_log']:
                            import wandb
                            wandb.log({"iter": self.iter_num, "train/loss": losses['train'], "val/loss": losses['val'],
                                       "lr": lr, "mfu": running_mfu * 100})
                    if losses['val'] < self.best_val_loss or c['always_save_checkpoint']:
                        self.best_val_loss = losses['val']
                        if self.iter_num > 0 and self.iter_num > self.start_iter:
                            self.save(snapshot, 'eval')
                            saved_at = self.iter_num
                if c['eval_only']:
                    break
                t1 = time.perf_counter()

                # one optimizer step over G micro-batches: this iteration's offsets are drawn at once and
                # each rank takes its slice, so the data do not depend on the number of processes
                offsets = self.sampler.draw(G_all * B).view(G_all, B)[self.ddp_rank * G:(self.ddp_rank + 1) * G]
                X, Y = self.sampler.batch(offsets[0])
                loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
                for micro_step in range(G):
                    self._check_interrupt()
                    if self.ddp:
                        # all-reduce the gradients only once, after the last micro-batch
                        self.model.require_backward_grad_sync = (micro_step == G - 1)
                    with self.ctx:
                        logits, loss = self.model(X, Y)
                        loss = loss / G  # the accumulated gradient is the mean over micro-batches
                    # fetch the next micro-batch while the GPU (if any) is still busy
                    if micro_step + 1 < G:
                        X, Y = self.sampler.batch(offsets[micro_step + 1])
                    self.scaler.scale(loss).backward()
                    loss_sum += loss.detach().float()

                self.interrupts.in_step = True
                # from here to the snapshot the model changes: Ctrl-C waits (see _Interrupts)
                optimizer_step(self.model, self.optimizer, self.scaler, c['grad_clip'])

                it = self.iter_num
                log_now = it % c['log_interval'] == 0
                if log_now:
                    if self.ddp:
                        self.dist.all_reduce(loss_sum)
                        loss_sum /= self.ddp_world_size
                    lossf = loss_sum.item()  # mean loss over this iteration's micro-batches (and ranks)
                t2 = time.perf_counter()
                step_s, dt = t2 - t1, t2 - t0
                step_times.append(step_s)
                self.result['step_ms'].append((it, step_s * 1000))
                if log_now:
                    self.result['losses'].append((it, lossf))
                if log_now and self.master_process:
                    tok_s = self.tokens_per_iter / step_s
                    if local_iter_num >= 5:  # skip the warm-up iterations
                        mfu = self.raw_model.estimate_mfu(B * G, step_s, self.peak)
                        running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
                    msg = (f"iter {it}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tok_s:,.0f} tok/s, "
                           f"mfu {running_mfu * 100:.2f}%")
                    if self.bar is None or self.bar.disable:
                        recent = sorted(step_times[-50:])[len(step_times[-50:]) // 2]
                        msg += f", eta {_fmt_secs(recent * (c['max_iters'] - it))}"
                    self.print(msg)
                    self.metrics.log({'kind': 'train', 'iter': it, 'loss': lossf, 'lr': lr, 'dt_ms': dt * 1000,
                                      'step_ms': step_s * 1000, 'tok_per_s': tok_s,
                                      'mfu': running_mfu if running_mfu >= 0 else None, 'time': time.time()})
                if self.bar is not None:
                    self.bar.update(1)
                    if log_now:
                        self.bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
                self.iter_num += 1
                local_iter_num += 1
                snapshot = capture_rng_state(self.sampler, raw=True)
                self.interrupts.in_step = False

                if self.iter_num > c['max_iters']:
                    # keep the final state too where every evaluation saves, or where nothing was saved
                    if c['always_save_checkpoint'] or saved_at is None:
                        self.save(snapshot, 'end')
                        saved_at = self.iter_num
                    break
        except KeyboardInterrupt:
            self.result['interrupted'] = True
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.interrupts.in_step:
                self.print("forced exit during the optimizer step: no checkpoint written "
                           f"(the last one, if any, is kept in {c['out_dir']})")
            elif self.iter_num > self.start_iter or c['init_from'] != 'resume':
                # the model and optimizer are as at the start of iteration iter_num (signals wait out the
                # optimizer step), and `snapshot` holds that moment's random states
                if self.ddp and self.stop_agreed:  # all ranks are here: gather their random states
                    self.save(snapshot, 'interrupt', gather=True)
                elif self.master_process:
                    self.save(snapshot, 'interrupt', gather=False)
                if self.master_process:
                    self.print(f"interrupted at iteration {self.iter_num}: checkpoint saved to "
                               f"{self.result['ckpt_path']}; continue with --init_from=resume")
            else:
                self.print("interrupted before the first iteration finished; no checkpoint written")
        self.interrupts.deferring = False
        if step_times and self.master_process:
            ms = sorted(step_times)[len(step_times) // 2] * 1000
            self.print(f"trained {local_iter_num} iterations in {time.time() - t_start:.1f}s; "
                       f"median {ms:.2f} ms/iteration (training step, evaluation excluded)")
        return self._finish()

    def _check_interrupt(self, boundary=False):
        """Raise KeyboardInterrupt here if Ctrl-C/SIGTERM was received. In DDP the ranks agree first, at
        iteration boundaries only, so that all of them stop at the same iteration."""
        if not self.ddp:
            self.interrupts.check()
            return
        if not boundary:
            return
        flag = torch.tensor(0.0 if self.interrupts.requested is None else 1.0, device=self.device)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.stop_agreed = True
            raise KeyboardInterrupt

    def _plot(self):
        try:
            from nanofast.metrics import plot_losses
            plot_losses(self.metrics.path, os.path.join(self.c['out_dir'], 'loss.png'),
                        title=f"{self.c['dataset']} ({self.c['n_layer']}L {self.c['n_head']}H {self.c['n_embd']}d)")
        except Exception as e:  # a plot must never stop training
            self.print(f"warning: could not draw loss.png ({type(e).__name__}: {e})")

    def _finish(self):
        self.result['iter_num'] = self.iter_num
        self.result['best_val_loss'] = self.best_val_loss
        if self.master_process and self.c['wandb_log']:
            import wandb
            wandb.finish()
        return self.result


def main(argv=None):
    """Entry point of `nanofast-train`: returns the exit status (0 done, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    def body():
        return 130 if run(get_config(argv))['interrupted'] else 0

    return run_cli('nanofast-train', body, failures=(DataError, CheckpointError))


if __name__ == '__main__':
    sys.exit(main())
