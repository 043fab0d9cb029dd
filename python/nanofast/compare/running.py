"""nanofast-compare's runs: one configuration trained on two targets (and, for the noise envelope, a
nudged twin of one of them) from the same weights and the same batches, step for step, each step timed;
then the verdict, printed and written out."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from nanofast.compare import reporting
from nanofast.compare.judging import judge, nudge_
from nanofast.compare.targets import (Target, TargetError, choose_targets, dropout_sharing, require_distinct,
                                      resolve_target, split_targets)
from nanofast.configurator import ConfigError
from nanofast.data import BatchSampler, load_meta, prepare_dataset, to_device
from nanofast.metrics import synchronize
from nanofast.training import build_optimizer, enable_tf32, get_lr, init_model, precision, train_step

COMPARE_DEFAULTS = dict(
    targets='',  # 'A,B' (or two positional arguments); see nanofast.compare's docstring for the grammar
    iters=50,  # iterations to run on each target
    noise=True,  # measure the noise envelope (a second, nudged run of the lower-precision target)
    tolerance=10.0,  # the gap may reach this many times the noise envelope and still count as noise
)


# -----------------------------------------------------------------------------
# one training run on one target


def initial_model(c, kernels, meta_vocab_size):
    """The model nanofast-train starts from (init_from='scratch', torch seeded with c['seed']), on the
    CPU; torch's generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c['seed'])
        return init_model(dict(c, kernels=kernels), meta_vocab_size)


class Run:
    """A model, optimizer and autocast context on one target, stepped like nanofast-train's loop."""

    def __init__(self, name, target: Target, c: dict, state_dict: dict, meta_vocab_size, *, seed_offset=0,
                 nudge_eps=None, nudge_seed=0):
        self.name, self.target, self.c = name, target, c
        self.device = target.device
        self.seed_offset = seed_offset
        model = initial_model(c, target.kernels, meta_vocab_size).model
        model.load_state_dict(state_dict)
        model.to(self.device)
        model.train()
        self.raw_model = model
        self.nudge_eps = nudge_eps
        self.nudge_gen = torch.Generator().manual_seed(nudge_seed) if nudge_eps else None
        if nudge_eps:
            nudge_(list(model.parameters()), nudge_eps, self.nudge_gen)
        self.prec = precision(target.dtype, target.device_type)
        self.optimizer = build_optimizer(model, c, target.device_type)
        self.model = torch.compile(model) if c['compile'] else model
        self.losses, self.step_s, self.grad_norms = [], [], []

    def step(self, lr, batches, seed):
        """One optimizer step over the micro-batches `batches` (CPU tensors), with torch's generators
        seeded with `seed` (+ this run's offset) first. Records the loss (mean over micro-batches),
        the gradient norm before clipping and the step's wall-clock time."""
        restore = None
        if self.nudge_eps:  # this step's forward and backward see weights nudged anew (restored below)
            params = list(self.raw_model.parameters())
            saved = [p.detach().clone() for p in params]
            nudge_(params, self.nudge_eps, self.nudge_gen)

            @torch.no_grad()
            def restore():
                for p, s in zip(params, saved):
                    p.copy_(s)

        torch.manual_seed(seed + self.seed_offset)
        synchronize(self.device)
        t0 = time.perf_counter()
        loss, norm = train_step(self.model, self.optimizer, self.prec,
                                lambda g: tuple(to_device(t, self.device) for t in batches[g]), len(batches),
                                self.c['grad_clip'], lr, before_update=restore)
        lossf = loss.item()
        synchronize(self.device)
        dt = time.perf_counter() - t0
        self.losses.append(lossf)
        self.step_s.append(dt)
        self.grad_norms.append(float(norm) if norm is not None else None)
        return lossf, dt


# -----------------------------------------------------------------------------
# the comparison


def compare_config(config, **overrides):
    """nanofast-train's DEFAULTS and COMPARE_DEFAULTS, updated by `config` and the overrides that are
    not None; a ConfigError where a value cannot work for a comparison."""
    from nanofast.train import DEFAULTS, validate_config
    c = dict(DEFAULTS)
    c.update(COMPARE_DEFAULTS)
    c.update(config)
    c.update({k: v for k, v in overrides.items() if v is not None})
    validate_config(c)
    if c['iters'] <= 0:
        raise ConfigError(f"iters must be positive, got {c['iters']}")
    if c['tolerance'] <= 0:
        raise ConfigError(f"tolerance must be positive, got {c['tolerance']}")
    if c['init_from'] != 'scratch':
        raise ConfigError(f"nanofast-compare trains from scratch; init_from={c['init_from']!r} is not supported")
    if int(os.environ.get('RANK', -1)) != -1:
        raise ConfigError("nanofast-compare runs in one process; start it without torchrun")
    return c


def pick_targets(targets, c):
    """(A, B, note): the two resolved targets for 0-2 specs or Targets (default: c['targets'])."""
    if targets is None:
        targets = split_targets(c['targets'])
    if any(isinstance(t, Target) for t in targets):
        resolved = [resolve_target(t, c) for t in targets]
        if len(resolved) != 2:
            raise TargetError(f"two targets are compared, got {len(resolved)}")
        return require_distinct(*resolved) + ("",)
    return choose_targets(list(targets), c)


def warmup_iters(n):
    """Iterations left out of the per-step time: the first (allocation, Triton/torch.compile
    compilation) and, in longer runs, up to 5."""
    return 0 if n <= 1 else min(5, max(1, n // 10))


def _median(xs):
    return float(np.median(xs)) if len(xs) else float("nan")


def compare(config: dict, targets=None, iters=None, noise=None, tolerance=None, out_dir=None, verbose=True) -> dict:
    """Run the comparison for `config` (nanofast-train's keys plus COMPARE_DEFAULTS'; missing keys take
    their defaults). `targets`: a list of 0-2 target specs or Targets (default: config['targets']).
    Writes compare.json, compare.csv and compare.png into out_dir and returns the summary dict."""
    c = compare_config(config, iters=iters, noise=noise, tolerance=tolerance, out_dir=out_dir)
    log = print if verbose else (lambda *a, **k: None)
    ta, tb, note = pick_targets(targets, c)
    if note:
        log(note)
    enable_tf32()  # as nanofast-train, before the targets' precisions are read
    shared, dropout_note = dropout_sharing(ta, tb, c['dropout'])

    # data, vocabulary and the initial weights, as nanofast-train
    data_dir = prepare_dataset(c['dataset'], c['data_dir'], c['data_path'], verbose=verbose)
    meta = load_meta(data_dir)
    meta_vocab_size = meta['vocab_size'] if meta is not None else None
    sampler = BatchSampler(os.path.join(data_dir, 'train.bin'), c['block_size'], seed=c['seed'], device='cpu')
    start = initial_model(c, 'torch', meta_vocab_size)
    state = {k: v.detach().clone() for k, v in start.model.state_dict().items()}
    n_params, vocab = start.model.get_num_params(), start.model_args['vocab_size']
    del start

    # the two runs, and the twin of the lower-precision one
    run_a = Run('A', ta, c, state, meta_vocab_size)
    run_b = Run('B', tb, c, state, meta_vocab_size)
    ref_run = run_b if tb.eps > ta.eps else run_a
    twin = None
    if c['noise']:
        twin = Run(ref_run.name + "'", ref_run.target, c, state, meta_vocab_size, nudge_eps=ref_run.target.eps,
                   nudge_seed=c['seed'] + 1, seed_offset=0 if shared else 1_000_003)
    for line in reporting.setup_lines(c, ta, tb, ref_run, twin, n_params, vocab, shared, dropout_note):
        log(line)

    N = c['iters']
    G, B = c['gradient_accumulation_steps'], c['batch_size']
    stride = max(1, math.ceil(N / 25))
    log(reporting.TABLE_HEADER)
    rows = []
    for it in range(N):
        lr = get_lr(it, c)
        offsets = sampler.draw(G * B).view(G, B)
        batches = [sampler.batch(offsets[g]) for g in range(G)]
        seed = c['seed'] + 7919 * it
        order = (run_a, run_b) if it % 2 == 0 else (run_b, run_a)  # alternate, so neither always goes first
        for r in order + ((twin,) if twin is not None else ()):
            r.step(lr, batches, seed)
        rows.append(_row(it, lr, run_a, run_b, ref_run, twin))
        if it % stride == 0 or it == N - 1:
            log(reporting.table_row(rows[-1]), flush=True)

    v = judge(run_a.losses, run_b.losses, ref_run.losses if twin else None, twin.losses if twin else None,
              tolerance=c['tolerance'])
    w0 = warmup_iters(N)
    ms_a, ms_b = _median(run_a.step_s[w0:]) * 1e3, _median(run_b.step_s[w0:]) * 1e3
    summary = dict(
        target_a=asdict(ta) | dict(label=ta.label, precision=ta.precision),
        target_b=asdict(tb) | dict(label=tb.label, precision=tb.precision),
        note=note, iters=N, seed=c['seed'], n_params=n_params, tokens_per_iter=G * B * c['block_size'],
        dropout=c['dropout'], masks_shared=shared, dropout_note=dropout_note,
        noise_reference=(twin.name if twin else None), noise_precision=ref_run.target.precision if twin else None,
        tolerance=c['tolerance'], agree=v['agree'], ratio=v['ratio'], worst_iter=v['worst_iter'],
        first_bad=v['first_bad'], window=v.get('window'), max_gap=v['max_gap'], rms_gap=v['rms_gap'],
        max_noise=v.get('max_envelope'), rms_noise=v.get('rms_envelope'),
        final_loss_a=run_a.losses[-1], final_loss_b=run_b.losses[-1],
        first_gap=rows[0]['gap'], first_noise=rows[0]['noise'],
        ms_per_iter_a=ms_a, ms_per_iter_b=ms_b, speedup_b_over_a=ms_a / ms_b, warmup_iters_excluded=w0,
        wall_s_a=sum(run_a.step_s), wall_s_b=sum(run_b.step_s), threads=torch.get_num_threads(),
    )
    summary['verdict'] = reporting.verdict_text(summary)
    summary['answer'] = reporting.answer_text(summary)
    for line in reporting.closing_lines(summary, sum(run_a.step_s[:w0]), sum(run_b.step_s[:w0])):
        log(line)

    os.makedirs(c['out_dir'], exist_ok=True)
    paths = reporting.write_reports(c['out_dir'], rows, summary, c, v)
    summary['files'] = paths
    log("")
    log("written: " + ", ".join(paths.values()))
    summary['rows'] = rows
    return summary


def _row(it, lr, run_a, run_b, ref_run, twin):
    """The table's row of iteration `it` (the runs' last step)."""
    la, lb = run_a.losses[-1], run_b.losses[-1]
    return dict(iter=it, lr=lr, loss_a=la, loss_b=lb, gap=lb - la,
                noise=abs(ref_run.losses[-1] - twin.losses[-1]) if twin is not None else None,
                loss_ref=ref_run.losses[-1], loss_twin=twin.losses[-1] if twin is not None else None,
                ms_a=run_a.step_s[-1] * 1e3, ms_b=run_b.step_s[-1] * 1e3,
                time_a=sum(run_a.step_s), time_b=sum(run_b.step_s),
                grad_norm_a=run_a.grad_norms[-1], grad_norm_b=run_b.grad_norms[-1])
