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
  step's tensors back in (nanofast/allocator.py)
- datasets are prepared on first use (nanofast/data.py; keys data_dir and data_path)
- batches come from a seeded generator of their own; every process draws the same offsets and takes
  its share, so a run's data do not depend on the number of processes
- out_dir/ckpt.pt (the latest state) is written atomically and holds every random state and the
  sampler's, so --init_from=resume continues exactly as the uninterrupted run would have on the same
  device; out_dir/ckpt_best.pt holds the state with the lowest val loss (nanofast/checkpoint.py says
  what a run keeps). Ctrl-C (or SIGTERM) saves a checkpoint and exits with status 130. Besides
  nanoGPT's saves at evaluations, the final state is saved at the end when always_save_checkpoint is
  True, or when the run saved nothing else (so a short run is never lost)
- best_val_loss is the lowest val loss of a saved state (nanoGPT's, with always_save_checkpoint,
  is the latest val loss)
- a loss or val loss that is not finite stops the run (exit status 1) without saving: the last
  checkpoint, saved while the run was finite, is kept. The training loss is checked where it is
  logged (every log_interval-th iteration, where it is read off the device anyway, so no step
  waits for it); the weights are checked before every save
- out_dir is locked (out_dir/train.lock): a second trainer on it stops with an error; the temporary
  files of a trainer killed while writing are removed
- resuming checks that the configuration asks for the checkpoint's model shape and the dataset has
  its vocabulary; token files are checked against the vocabulary once, at the start
- a progress bar with ETA; per-iteration loss, time, tokens/s and MFU (against this device's measured
  matmul peak); out_dir/metrics.jsonl; out_dir/loss.png redrawn at each evaluation
- the logged loss is the mean over the iteration's micro-batches (and processes); nanoGPT logs the
  last micro-batch's
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanofast.allocator import retain_freed_memory
from nanofast.checkpoint import (BEST_NAME, CKPT_NAME, FORMAT, VERSION, CheckpointError, capture_rng_state,
                                 keep_as_best, restore_rng_state, rng_state_for_checkpoint, save_checkpoint)
from nanofast.configurator import ConfigError, configure, run_cli
from nanofast.data import BatchSampler, DataError, check_token_ids, load_meta, prepare_dataset
from nanofast.interrupts import Interrupts
from nanofast.model import GPT, KERNELS, NANOGPT_MODEL_ARGS
from nanofast.run_dir import RunDirError, open_run_dir
from nanofast.training import (Precision, build_optimizer, describe_optimizer, device_type_of, estimate_loss, get_lr,
                               init_model, precision, precision_error, resolve_device, resolve_dtype, train_step)

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
    compile_mode='default',  # torch.compile's mode; 'reduce-overhead' replays each step as CUDA graphs
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


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


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
    for k in ('warmup_iters', 'lr_decay_iters'):
        if c[k] < 0:
            bad(f"{k} must be >= 0, got {c[k]}")
    # a learning rate, decay or clip of inf, nan or below zero gives nan weights within a few steps
    for k in ('learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'peak_flops'):
        if not math.isfinite(c[k]) or c[k] < 0:
            bad(f"{k} must be a finite number >= 0, got {c[k]}" + (" (0 disables clipping)" if k == 'grad_clip' else ""))
    for k in ('beta1', 'beta2'):
        if not 0.0 <= c[k] < 1.0:
            bad(f"{k} must be in [0, 1), got {c[k]}")
    if c['n_embd'] % c['n_head'] != 0:
        bad(f"n_embd ({c['n_embd']}) must be a multiple of n_head ({c['n_head']})")
    if not 0.0 <= c['dropout'] < 1.0:
        bad(f"dropout must be in [0, 1), got {c['dropout']}")
    if c['init_from'] not in ('scratch', 'resume') and c['init_from'] not in GPT.GPT2_SIZES:
        bad(f"init_from must be 'scratch', 'resume' or a GPT-2 model (gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
            f"got {c['init_from']!r}")
    if c['kernels'] not in KERNELS:
        bad(f"kernels must be one of {KERNELS}, got {c['kernels']!r}")
    if c['compile_mode'] not in COMPILE_MODES:
        bad(f"compile_mode must be one of {COMPILE_MODES}, got {c['compile_mode']!r}")
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


class TrainingDiverged(RuntimeError):
    """The loss or the weights are no longer finite: the run stops without saving them."""


# -----------------------------------------------------------------------------
# DDP setup


@dataclass
class Processes:
    """This process among the training processes: the only one, or one of those torchrun started."""
    device: str
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0  # the master prints, logs and writes checkpoints

    @classmethod
    def start(cls, c):
        device = resolve_device(c['device'])
        if int(os.environ.get('RANK', -1)) == -1:  # not launched by torchrun
            return cls(device)
        rank = int(os.environ['RANK'])
        local_rank = int(os.environ.get('LOCAL_RANK', rank))
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
            backend = c['backend']
        else:
            backend = 'gloo' if c['backend'] == 'nccl' else c['backend']
        dist.init_process_group(backend=backend)
        procs = cls(device, True, rank, local_rank, int(os.environ['WORLD_SIZE']))
        # gradient_accumulation_steps counts micro-batches over all processes: each does its share
        if c['gradient_accumulation_steps'] % procs.world_size != 0:
            procs.stop()
            raise ConfigError(f"gradient_accumulation_steps ({c['gradient_accumulation_steps']}) must be a "
                              f"multiple of the number of processes ({procs.world_size})")
        return procs

    def stop(self):
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()

    def mean(self, t):
        """The mean of tensor `t` over the processes (in place)."""
        if self.ddp:
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def anyone(self, flag):
        """Whether `flag` is true in any process (every process must ask)."""
        t = torch.tensor(1.0 if flag else 0.0, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() > 0

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] in every process."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


class Console:
    """print() on the master process, through the progress bar while one is shown."""

    def __init__(self, master):
        self.master = master
        self.bar = None

    def __call__(self, *args):
        if not self.master:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(' '.join(str(x) for x in args))
        else:
            print(*args, flush=True)

    def open_bar(self, total, initial):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, initial=initial, unit='it', dynamic_ncols=True, disable=None, leave=False,
                        file=sys.stderr)

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -----------------------------------------------------------------------------
# the run: setup in nanoGPT's order, then the training loop


def run(config):
    """Train with `config` (a dict of DEFAULTS' keys). Returns a summary dict:
    iter_num, best_val_loss, losses [(iter, loss)], evals [(iter, train_loss, val_loss)],
    step_ms [(iter, ms)], interrupted, out_dir, ckpt_path, best_path. TrainingDiverged where the
    loss stops being finite; RunDirError where out_dir cannot be used."""
    c = dict(DEFAULTS)
    c.update(config)
    validate_config(c)
    interrupts = Interrupts().install()
    try:
        procs = Processes.start(c)
        try:
            log = Console(procs.master)
            lock = open_run_dir(c['out_dir'], log) if procs.master else None
            try:
                return TrainingLoop(c, procs, interrupts, log, setup(c, procs, log)).run()
            finally:
                log.close_bar()
                if lock is not None:
                    lock.release()
        finally:
            procs.stop()
    finally:
        interrupts.uninstall()


@dataclass
class Setup:
    """What the training loop runs: built by setup()."""
    prec: Precision
    sampler: BatchSampler  # the training batches (every rank draws the same offsets and takes its share)
    bins: dict  # 'train', 'val': the paths of the token files
    meta: dict | None  # the dataset's vocabulary
    raw_model: torch.nn.Module  # the plain module: its state_dict has nanoGPT's keys
    model: torch.nn.Module  # compiled and/or wrapped in DDP
    eval_model: torch.nn.Module  # compiled, not wrapped
    model_args: dict
    optimizer: torch.optim.Optimizer
    iter_num: int
    best_val_loss: float
    ckpt_reason: str | None  # why out_dir/ckpt.pt was written ('eval', 'end', 'interrupt'; None: unknown)
    resume_rng: dict | None  # the random states to continue from


def setup(c, procs, log):
    """Device and precision, data, model, optimizer, compile and DDP, as nanoGPT's train.py sets them up."""
    # the system: device, precision, seeds
    device_type = device_type_of(procs.device)
    dtype = resolve_dtype(c['dtype'], device_type)
    unsupported = precision_error(dtype, device_type, c['kernels'])
    if unsupported:
        raise ConfigError(f"dtype={unsupported}; use --dtype=bfloat16 (or --kernels=torch)")
    log(f"device: {procs.device}" + (f" ({torch.get_num_threads()} threads)" if device_type == 'cpu' else "")
        + f", dtype: {dtype}, kernels: {c['kernels']}" + (f", DDP world size {procs.world_size}" if procs.ddp else ""))
    log(f"tokens per iteration will be: {c['gradient_accumulation_steps'] * c['batch_size'] * c['block_size']:,}")
    if device_type == 'cpu' and c['retain_memory']:
        retain_freed_memory()
    torch.manual_seed(c['seed'] + procs.rank)  # different dropout on each rank
    prec = precision(dtype, device_type)

    # data: prepared once (by one process per node), then memmapped
    data_dir = None
    if procs.local_rank == 0:
        data_dir = prepare_dataset(c['dataset'], c['data_dir'], c['data_path'], verbose=procs.master)
    if procs.ddp:
        dist.barrier()
        if procs.local_rank != 0:
            data_dir = prepare_dataset(c['dataset'], c['data_dir'], c['data_path'], verbose=False)
    log(f"data: {data_dir}")
    bins = {s: os.path.join(data_dir, f'{s}.bin') for s in ('train', 'val')}
    sampler = BatchSampler(bins['train'], c['block_size'], seed=c['seed'], device=procs.device)
    BatchSampler(bins['val'], c['block_size'], seed=0)  # fails clearly if val is shorter than a block
    meta = load_meta(data_dir)
    meta_vocab_size = meta['vocab_size'] if meta is not None else None
    if meta_vocab_size is not None:
        log(f"found vocab_size = {meta_vocab_size} (inside {os.path.join(data_dir, 'meta.pkl')})")

    # the model
    start = init_model(c, meta_vocab_size, log=log, meta=meta)
    model = start.model
    for path in bins.values():
        check_token_ids(path, model.config.vocab_size)
    log("number of parameters: %.2fM" % (model.get_num_params() / 1e6,))
    model.to(procs.device)

    # the optimizer, and what a resumed run continues from
    optimizer = build_optimizer(model, c, device_type)
    for line in describe_optimizer(optimizer):
        log(line)
    resume_rng = None
    if start.checkpoint is not None:
        resume_rng = resume_states(start.checkpoint, optimizer, prec.scaler, sampler, c, procs, log)

    # compile, DDP
    compiled = model
    if c['compile']:
        log("compiling the model... (takes a ~minute)")
        compiled = torch.compile(model, mode=None if c['compile_mode'] == 'default' else c['compile_mode'])
    wrapped = compiled
    if procs.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(compiled, device_ids=[procs.local_rank] if device_type == 'cuda' else None)
    return Setup(prec, sampler, bins, meta, model, wrapped, compiled,
                 {k: start.model_args[k] for k in NANOGPT_MODEL_ARGS}, optimizer, start.iter_num, start.best_val_loss,
                 start.checkpoint.get('reason') if start.checkpoint is not None else None, resume_rng)


def resume_states(checkpoint, optimizer, scaler, sampler, c, procs, log):
    """Load the optimizer's and the scaler's states from `checkpoint`; return this rank's random states
    (or, where the checkpoint has none for it, reseed dropout and return None)."""
    # keep this device's implementation choice: torch's load_state_dict takes the saved groups' flags
    # and places each 'step' by them (on the parameter's device only for fused or capturable groups), so
    # a CPU checkpoint resumed by a fused CUDA AdamW must carry this optimizer's flags into the load
    flags = [{k: g[k] for k in ('fused', 'foreach', 'capturable') if k in g} for g in optimizer.param_groups]
    saved = checkpoint['optimizer']
    optimizer.load_state_dict({**saved, 'param_groups': [{**g, **f} for g, f in zip(saved['param_groups'], flags)]})
    if checkpoint.get('scaler') and scaler.is_enabled():
        scaler.load_state_dict(checkpoint['scaler'])
    per_rank = checkpoint.get('rng_per_rank') or [checkpoint.get('rng')]
    if procs.rank < len(per_rank) and per_rank[procs.rank] is not None:
        return per_rank[procs.rank]
    # no state recorded for this rank: the data order still continues (the sampler's state is the
    # same on every rank); dropout gets a fresh seed
    log("note: the checkpoint has no random states for this process (a nanoGPT checkpoint, or a "
        "different number of processes); dropout is reseeded")
    torch.manual_seed(c['seed'] + procs.rank + 7919 * int(checkpoint['iter_num']))
    if per_rank and per_rank[0] is not None and per_rank[0].get('sampler') is not None:
        sampler.load_state_dict(per_rank[0]['sampler'])
    return None


# -----------------------------------------------------------------------------
# the training loop


class TrainingLoop:
    """nanoGPT's loop: at every eval_interval-th iteration evaluate (and checkpoint), then one
    optimizer step over gradient_accumulation_steps micro-batches, then log; stop after max_iters.
    Ctrl-C and SIGTERM are taken at safe points and save a checkpoint (see Interrupts)."""

    def __init__(self, c, procs, interrupts, log, s: Setup):
        self.c, self.procs, self.interrupts, self.log, self.s = c, procs, interrupts, log, s
        self.iter_num, self.best_val_loss = s.iter_num, s.best_val_loss
        self.start_iter = s.iter_num
        self.ckpt_reason = s.ckpt_reason
        self.grad_accum = c['gradient_accumulation_steps'] // procs.world_size  # micro-batches of this process
        self.result = dict(iter_num=0, best_val_loss=None, losses=[], evals=[], step_ms=[], interrupted=False,
                           out_dir=c['out_dir'], ckpt_path=os.path.join(c['out_dir'], CKPT_NAME),
                           best_path=os.path.join(c['out_dir'], BEST_NAME))
        self.saves = 0  # checkpoints this run wrote
        self.stop_agreed = False  # DDP: all ranks agreed to stop at an iteration boundary
        self.new_best = False  # the last evaluation lowered best_val_loss
        self.metrics = self.peak = None
        self.running_mfu = -1.0
        self.peak_remeasured = False  # the cached matmul peak was measured again this run (log_step)
        self.step_times = []  # seconds of each training step this run
        if procs.master:
            from nanofast.metrics import MetricsLog
            self.peak = c['peak_flops'] if c['peak_flops'] > 0 else None
            self.metrics = MetricsLog(os.path.join(c['out_dir'], 'metrics.jsonl'), truncate_from_iter=self.iter_num)
            if c['wandb_log']:
                try:
                    import wandb
                except ImportError:
                    raise ConfigError("wandb_log=True needs the wandb package (pip install wandb)") from None
                wandb.init(project=c['wandb_project'], name=c['wandb_run_name'], config=c)

    def run(self):
        c, s = self.c, self.s
        if self.iter_num > c['max_iters'] and not c['eval_only']:
            self.log(f"nothing to do: the checkpoint is at iteration {self.iter_num}, past max_iters={c['max_iters']}")
            return self.finish()
        if s.resume_rng is not None:
            for note in restore_rng_state(s.resume_rng, s.sampler):
                self.log("note: " + note)
        if self.procs.master:
            if self.peak is None:
                from nanofast.metrics import peak_flops
                self.peak = peak_flops(self.procs.device, s.prec.ptdtype, fallback_dir=c['out_dir'])
            self.log.open_bar(c['max_iters'] + 1, self.iter_num)
        snapshot = capture_rng_state(s.sampler, raw=True)  # the random states at the start of this iteration
        saved_at = None  # the iteration of this run's last checkpoint
        t_start = time.time()
        try:
            self.interrupts.deferring = True
            while True:
                self.check_interrupt(boundary=True)
                t0 = time.perf_counter()
                lr = get_lr(self.iter_num, c)
                if self.iter_num % c['eval_interval'] == 0 and self.evaluate(lr):
                    self.save(snapshot, 'eval', best=self.new_best)
                    saved_at = self.iter_num
                if c['eval_only']:
                    break
                self.step(lr, t0)
                snapshot = capture_rng_state(s.sampler, raw=True)
                self.interrupts.in_step = False
                if self.iter_num > c['max_iters']:
                    # keep the final state too where every evaluation saves, or where nothing was saved
                    if c['always_save_checkpoint'] or saved_at is None:
                        self.save(snapshot, 'end')
                    break
        except KeyboardInterrupt:
            self.interrupted(snapshot)
        self.interrupts.deferring = False
        if self.step_times and self.procs.master:
            ms = sorted(self.step_times)[len(self.step_times) // 2] * 1000
            self.log(f"trained {len(self.step_times)} iterations in {time.time() - t_start:.1f}s; "
                     f"median {ms:.2f} ms/iteration (training step, evaluation excluded)")
        return self.finish()

    def evaluate(self, lr):
        """estimate_loss, logged; True where a checkpoint is saved now (val loss improved, or
        always_save_checkpoint), past the iteration the run started from. best_val_loss follows the
        saved states only, so that it always names a checkpoint that exists."""
        c, s = self.c, self.s
        losses = estimate_loss(s.eval_model, s.bins, c, s.prec.ctx, self.procs.device, self.procs.rank,
                               self.procs.world_size, check=self.check_interrupt)
        self.result['evals'].append((self.iter_num, losses['train'], losses['val']))
        self.log(f"step {self.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if self.procs.master:
            self.metrics.log({'kind': 'eval', 'iter': self.iter_num, 'train_loss': losses['train'],
                              'val_loss': losses['val'], 'lr': lr, 'time': time.time()})
            self.plot()
            if c['wandb_log']:
                import wandb
                wandb.log({"iter": self.iter_num, "train/loss": losses['train'], "val/loss": losses['val'],
                           "lr": lr, "mfu": self.running_mfu * 100})
        if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
            self.diverged(f"the evaluated loss is not finite (train {losses['train']}, val {losses['val']})")
        if not (self.iter_num > 0 and self.iter_num > self.start_iter):
            return False  # the state the run started from: saved already, or the initialisation
        self.new_best = losses['val'] < self.best_val_loss
        if self.new_best:
            self.best_val_loss = losses['val']
        return self.new_best or c['always_save_checkpoint']

    def step(self, lr, t0):
        """One training iteration: this iteration's offsets are drawn at once and each rank takes its
        slice (so the data do not depend on the number of processes), then train_step; then the log."""
        c, s, G, B = self.c, self.s, self.grad_accum, self.c['batch_size']
        t1 = time.perf_counter()
        rank = self.procs.rank
        offsets = s.sampler.draw(G * self.procs.world_size * B).view(-1, B)[rank * G:(rank + 1) * G]
        # from before_update to the next snapshot the model changes: Ctrl-C waits (see Interrupts)
        loss, _ = train_step(s.model, s.optimizer, s.prec, lambda i: s.sampler.batch(offsets[i]), G, c['grad_clip'],
                             lr, check=self.check_interrupt,
                             before_update=lambda: setattr(self.interrupts, 'in_step', True))
        it = self.iter_num
        log_now = it % c['log_interval'] == 0
        if log_now:
            lossf = self.procs.mean(loss).item()  # mean loss over this iteration's micro-batches (and ranks)
            if not math.isfinite(lossf):  # checked here, where the loss is read anyway: no step waits for it
                self.diverged(f"the loss is {lossf} at iteration {it}")
        t2 = time.perf_counter()
        self.step_times.append(t2 - t1)
        self.result['step_ms'].append((it, (t2 - t1) * 1000))
        if log_now:
            self.result['losses'].append((it, lossf))
            if self.procs.master:
                self.log_step(it, lossf, lr, t2 - t1, t2 - t0)
        if self.log.bar is not None:
            self.log.bar.update(1)
            if log_now:
                self.log.bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
        self.iter_num += 1

    def diverged(self, what):
        """Stop the run: the loss (or the weights) are no longer finite. Nothing is saved."""
        c = self.c
        self.log.close_bar()
        raise TrainingDiverged(
            f"{what}: training diverged (learning_rate={c['learning_rate']}, grad_clip={c['grad_clip']}); stopped "
            f"without saving, so the last checkpoint in {c['out_dir']} (if any) holds finite weights. Lower "
            f"learning_rate (or set grad_clip) and resume, or start again")

    def log_step(self, it, lossf, lr, step_s, dt):
        """Print and record an iteration: loss, time, tokens/s, MFU (and, without a progress bar, ETA)."""
        c = self.c
        tok_s = c['gradient_accumulation_steps'] * c['batch_size'] * c['block_size'] / step_s
        if len(self.step_times) > 5:  # skip the warm-up iterations
            mfu = self.s.raw_model.estimate_mfu(c['batch_size'] * self.grad_accum, step_s, self.peak)
            if mfu > 1.0 and c['peak_flops'] <= 0 and not self.peak_remeasured:
                # a step faster than the device's matmul peak allows: the cached probe is stale (measured
                # on another machine behind the same name, or while the CPU was busy): measure it again
                from nanofast.metrics import peak_flops
                stale, self.peak_remeasured = self.peak, True
                self.peak = peak_flops(self.procs.device, self.s.prec.ptdtype, fallback_dir=c['out_dir'],
                                       verbose=False, refresh=True)
                self.log(f"note: this step ran at {mfu * 100:.0f}% of the cached matmul peak ({stale / 1e9:,.1f} "
                         f"GFLOP/s); measured again: {self.peak / 1e9:,.1f} GFLOP/s")
                mfu = self.s.raw_model.estimate_mfu(c['batch_size'] * self.grad_accum, step_s, self.peak)
            self.running_mfu = mfu if self.running_mfu == -1.0 else 0.9 * self.running_mfu + 0.1 * mfu
        msg = (f"iter {it}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tok_s:,.0f} tok/s, "
               f"mfu {self.running_mfu * 100:.2f}%")
        if self.log.bar is None or self.log.bar.disable:
            recent = sorted(self.step_times[-50:])[len(self.step_times[-50:]) // 2]
            msg += f", eta {_fmt_secs(recent * (c['max_iters'] - it))}"
        self.log(msg)
        self.metrics.log({'kind': 'train', 'iter': it, 'loss': lossf, 'lr': lr, 'dt_ms': dt * 1000,
                          'step_ms': step_s * 1000, 'tok_per_s': tok_s,
                          'mfu': self.running_mfu if self.running_mfu >= 0 else None, 'time': time.time()})

    def check_interrupt(self, boundary=False):
        """Raise KeyboardInterrupt here if Ctrl-C/SIGTERM was received. In DDP the ranks agree first, at
        iteration boundaries only, so that all of them stop at the same iteration."""
        if not self.procs.ddp:
            self.interrupts.check()
        elif boundary and self.procs.anyone(self.interrupts.requested is not None):
            self.stop_agreed = True
            raise KeyboardInterrupt

    def interrupted(self, snapshot):
        """After Ctrl-C: save the state at the start of iteration iter_num (signals wait out the
        optimizer step, and `snapshot` holds that moment's random states)."""
        c = self.c
        self.result['interrupted'] = True
        self.log.close_bar()
        if self.interrupts.in_step:
            self.log("forced exit during the optimizer step: no checkpoint written "
                     f"(the last one, if any, is kept in {c['out_dir']})")
        elif self.iter_num > self.start_iter or c['init_from'] != 'resume':
            if self.procs.ddp and self.stop_agreed:  # all ranks are here: gather their random states
                self.save(snapshot, 'interrupt', gather=True)
            elif self.procs.master:
                self.save(snapshot, 'interrupt', gather=False)
            self.log(f"interrupted at iteration {self.iter_num}: checkpoint saved to "
                     f"{self.result['ckpt_path']}; continue with --init_from=resume")
        else:
            self.log("interrupted before the first iteration finished; no checkpoint written")

    def plot(self):
        try:
            from nanofast.metrics import plot_losses
            plot_losses(self.metrics.path, os.path.join(self.c['out_dir'], 'loss.png'),
                        title=f"{self.c['dataset']} ({self.c['n_layer']}L {self.c['n_head']}H {self.c['n_embd']}d)")
        except Exception as e:  # a plot must never stop training
            self.log(f"warning: could not draw loss.png ({type(e).__name__}: {e})")

    def finish(self):
        self.result['iter_num'] = self.iter_num
        self.result['best_val_loss'] = self.best_val_loss
        if self.procs.master and self.c['wandb_log']:
            import wandb
            wandb.finish()
        return self.result

    # -------------------------------------------------------------------------------------------
    # checkpointing

    def save(self, rng, reason, gather=True, best=False):
        """Write out_dir/ckpt.pt atomically (master), and with best=True make it ckpt_best.pt too;
        with gather, all ranks send their random states. Weights that are not finite are never saved."""
        params = [p.detach() for p in self.s.raw_model.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            self.diverged(f"the weights are not finite at iteration {self.iter_num}")
        rng = rng_state_for_checkpoint(rng)
        per_rank = self.procs.gather(rng) if gather else [rng] + [None] * (self.procs.world_size - 1)
        if not self.procs.master:
            return
        c, path, best_path = self.c, self.result['ckpt_path'], self.result['best_path']
        self.log(f"saving checkpoint to {c['out_dir']}")
        if not best and self.saves == 0:
            self.before_first_save(path, best_path)
        save_checkpoint(self.checkpoint(per_rank[0], per_rank, reason), path)
        if best:
            keep_as_best(path, best_path)
        self.saves += 1
        self.ckpt_reason = reason

    def before_first_save(self, path, best_path):
        """ckpt_best.pt belongs to this run: a new run drops an earlier run's; a resumed run whose
        ckpt.pt is the best state of a run that kept no ckpt_best.pt (nanoGPT's, with
        always_save_checkpoint=False) keeps it as ckpt_best.pt before replacing it."""
        if self.c['init_from'] != 'resume':
            if os.path.exists(best_path):
                os.unlink(best_path)
        elif (not os.path.exists(best_path) and os.path.exists(path) and self.ckpt_reason in ('eval', None)
              and not self.c['always_save_checkpoint']):
            keep_as_best(path, best_path)
            self.log(f"kept the best checkpoint (val loss {self.best_val_loss:.4f}) as {best_path}")

    def checkpoint(self, rng, rng_per_rank, reason):
        """nanoGPT's checkpoint dict, plus what resuming exactly needs (see nanofast.checkpoint)."""
        s, meta = self.s, None
        if s.meta is not None and 'itos' in s.meta:
            meta = {'vocab_size': int(s.meta['vocab_size']), 'itos': {int(k): str(v) for k, v in s.meta['itos'].items()}}
        return {
            'model': s.raw_model.state_dict(),
            'optimizer': s.optimizer.state_dict(),
            'model_args': dict(s.model_args),
            'iter_num': self.iter_num,
            'best_val_loss': float(self.best_val_loss),
            'config': dict(self.c),
            'rng': rng,
            'rng_per_rank': rng_per_rank,
            'scaler': s.prec.scaler.state_dict() if s.prec.scaler.is_enabled() else None,
            'meta': meta,
            'format': FORMAT,
            'version': VERSION,
            'reason': reason,
        }


def _fmt_secs(s):
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def main(argv=None):
    """Entry point of `nanofast-train`: returns the exit status (0 done, 2 bad arguments, 1 failed:
    bad data or checkpoint, out_dir unusable or in use, training diverged; 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else argv

    def body():
        return 130 if run(get_config(argv))['interrupted'] else 0

    return run_cli('nanofast-train', body, failures=(DataError, CheckpointError, RunDirError, TrainingDiverged))


if __name__ == '__main__':
    sys.exit(main())
