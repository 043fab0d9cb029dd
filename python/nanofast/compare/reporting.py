"""nanofast-compare's reports: the lines printed while it runs (the setup, the per-iteration table, the
closing figures), the verdict and the plain-language answer, and the files written to out_dir
(compare.csv, compare.json, compare.png)."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

# -----------------------------------------------------------------------------
# printed while it runs


def setup_lines(c, ta, tb, ref_run, twin, n_params, vocab, shared, dropout_note):
    """What is compared with what, on which model, and where the noise envelope comes from."""
    G, B = c['gradient_accumulation_steps'], c['batch_size']
    lines = [f"A = {ta.label}" + (f"  ({ta.spec})" if ta.spec else ""),
             f"B = {tb.label}" + (f"  ({tb.spec})" if tb.spec else ""),
             f"model: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} dims, block {c['block_size']}, "
             f"vocab {vocab}, {n_params / 1e6:.2f}M parameters; batch {B} x {G} micro-batches; {c['iters']} "
             f"iterations from seed {c['seed']}",
             f"dropout masks: {dropout_note}"]
    if twin is not None:
        ref = ref_run.target
        why = f"the lower-precision target ({ref.precision})" if ta.eps != tb.eps else "target A"
        lines.append(f"noise envelope: {ref_run.name} vs {twin.name}, {why} run again with its weights nudged at "
                     f"{ref.precision} rounding level (at the start, and for every step's forward and backward)"
                     + ("" if shared else ", and other dropout masks"))
    return lines


TABLE_HEADER = (f"{'iter':>6} {'lr':>9} {'loss A':>10} {'loss B':>10} {'gap B-A':>11} {'noise':>10} {'ms A':>9} "
                f"{'ms B':>9} {'B speedup':>9}")


def table_row(r):
    noise = f"{r['noise']:10.2e}" if r['noise'] is not None else f"{'-':>10}"
    return (f"{r['iter']:>6} {r['lr']:9.2e} {r['loss_a']:10.5f} {r['loss_b']:10.5f} {r['gap']:+11.2e} {noise} "
            f"{r['ms_a']:9.2f} {r['ms_b']:9.2f} {r['ms_a'] / r['ms_b']:8.2f}x")


def closing_lines(s, warmup_s_a, warmup_s_b):
    """The time per step, the first iteration's gap, the verdict and the answer."""
    w0, speedup = s['warmup_iters_excluded'], s['speedup_b_over_a']
    lines = ["", f"time per iteration (median, first {w0} left out): A {s['ms_per_iter_a']:.2f} ms, "
                 f"B {s['ms_per_iter_b']:.2f} ms: B is {speedup:.2f}x {'faster' if speedup >= 1 else 'slower'} per step"]
    if w0:
        lines.append(f"first {w0} iteration(s) (allocation, compilation; not in the medians): A {warmup_s_a:.2f} s, "
                     f"B {warmup_s_b:.2f} s")
    lines.append(f"iteration 0 (same weights, same batch): gap {s['first_gap']:+.2e}"
                 + (f", noise {s['first_noise']:.2e}" if s['first_noise'] is not None else ""))
    return lines + ["verdict: " + s['verdict'], "", s['answer']]


# -----------------------------------------------------------------------------
# the verdict and the answer


def verdict_text(s: dict) -> str:
    if s['agree'] is None:
        return (f"no noise envelope measured (--noise=False): largest gap {s['max_gap']:.2e}, "
                f"final gap (B - A) {s['final_loss_b'] - s['final_loss_a']:+.2e}")
    kind = "rounding noise" if s['masks_shared'] else "the noise of other dropout masks"
    if s['agree']:
        return (f"AGREE: the losses agree within {kind} at every iteration (largest gap {s['max_gap']:.2e}; "
                f"at most {s['ratio']:.1f}x the envelope, {s['tolerance']:g}x allowed)")
    if s['ratio'] == math.inf:
        return f"DIFFER: a target's loss is not finite (from iteration {s['first_bad']})"
    return (f"DIFFER: the losses differ beyond {kind} from iteration {s['first_bad']} on (gap up to "
            f"{s['ratio']:.1f}x the envelope at iteration {s['worst_iter']}, {s['tolerance']:g}x allowed; largest gap "
            f"{s['max_gap']:.2e}, envelope up to {s['max_noise']:.2e})")


def _fmt_s(sec):
    if sec < 10:
        return f"{sec:.2f} s"
    return f"{sec:.1f} s" if sec < 120 else (f"{sec / 60:.1f} min" if sec < 7200 else f"{sec / 3600:.1f} h")


def answer_text(s: dict) -> str:
    """The plain-language answer to "is my run behind because of fewer steps or because of the hardware?"."""
    ta, tb = s['target_a'], s['target_b']
    a, b = ta['label'], tb['label']
    x = s['speedup_b_over_a']
    if x >= 1:
        fast, slow, f, ms_fast, ms_slow = b, a, x, s['ms_per_iter_b'], s['ms_per_iter_a']
    else:
        fast, slow, f, ms_fast, ms_slow = a, b, 1 / x, s['ms_per_iter_a'], s['ms_per_iter_b']
    differs = [k for k in ('device', 'dtype', 'kernels') if ta.get(k) != tb.get(k)]
    if not differs:  # compare() refuses such a pair (require_distinct); a summary built by hand may hold one
        return (f"Not judged: both runs are {a}, so they differ in nothing; any speed difference between them "
                f"({x:.2f}x) is timing noise.")
    cause = "the hardware" if "device" in differs else f"the {' and '.join(differs)}"
    speed = (f"{fast} takes {ms_fast:.2f} ms per step and {slow} {ms_slow:.2f} ms: {fast} is {f:.2f}x faster per "
             f"step, so in the same wall-clock time it does {f:.2f}x as many steps")
    n = s.get('iters')
    if n and f >= 1.05:
        speed += (f" ({n} steps take {slow} {_fmt_s(n * ms_slow / 1e3)}; in that time {fast} does about "
                  f"{n * f:,.0f})")
    q = "Is a run behind because of fewer steps or because of the hardware?\n  "
    if s['agree'] is None:
        return q + f"Not judged (no noise envelope: run with --noise=True). {speed}."
    if s['agree']:
        same = ("step for step, within rounding noise" if s['masks_shared'] else
                "step for step, as closely as different dropout masks allow")
        if f < 1.05:
            return q + (f"Neither: the losses agree {same}, and a step takes about as long on both "
                        f"({ms_fast:.2f} vs {ms_slow:.2f} ms); equal steps and equal time end alike.")
        return q + (f"Fewer steps, because of {cause}: the losses agree {same}, so the same number of steps gives "
                    f"the same model on both, and only the time per step differs. {speed}.\n  A run on {slow} that "
                    f"is behind is behind in steps only; at equal step counts it matches, and it needs {f:.2f}x the "
                    f"wall-clock time to get there.")
    return q + (f"Not only steps: the losses differ beyond the numerical noise (see the verdict), so the two targets "
                f"do not train the same model step for step, and equal numbers of steps need not give equal losses "
                f"(after {s['iters']} steps: A {s['final_loss_a']:.4f}, B {s['final_loss_b']:.4f}). Speed aside: "
                f"{speed}.")


# -----------------------------------------------------------------------------
# files


def write_reports(out_dir, rows, summary, c, v) -> dict:
    paths = {}
    keys = list(rows[0].keys())
    p = os.path.join(out_dir, 'compare.csv')
    with open(p, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ('' if r[k] is None else r[k]) for k in keys})
    paths['csv'] = p
    p = os.path.join(out_dir, 'compare.json')
    cfg = {k: (val if isinstance(val, (int, float, str, bool, type(None))) else str(val)) for k, val in c.items()}

    def clean(x):
        return None if isinstance(x, float) and not math.isfinite(x) else x

    with open(p, 'w') as f:
        json.dump({'summary': {k: clean(val) for k, val in summary.items()}, 'config': cfg, 'iterations': rows}, f,
                  indent=1)
    paths['json'] = p
    png = plot_comparison(os.path.join(out_dir, 'compare.png'), rows, summary, v)
    if png:
        paths['png'] = png
    return paths


def plot_comparison(path, rows, s, v):
    """loss vs iteration, loss vs wall-clock seconds, and |gap| vs the noise envelope (log scale)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None
    a, b = s['target_a']['label'], s['target_b']['label']
    it = [r['iter'] for r in rows]
    fig = Figure(figsize=(16, 4.6))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(it, [r['loss_a'] for r in rows], label=f"A {a}", color="C0")
    ax1.plot(it, [r['loss_b'] for r in rows], label=f"B {b}", color="C1", linestyle="--")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("training loss")
    ax1.set_title("loss per step")
    ax2.plot([r['time_a'] for r in rows], [r['loss_a'] for r in rows], label=f"A {a}", color="C0")
    ax2.plot([r['time_b'] for r in rows], [r['loss_b'] for r in rows], label=f"B {b}", color="C1", linestyle="--")
    ax2.set_xlabel("wall-clock seconds (training steps)")
    ax2.set_ylabel("training loss")
    ax2.set_title(f"loss against time: B {s['speedup_b_over_a']:.2f}x the speed of A")
    floor = 1e-12
    ax3.semilogy(it, [max(abs(r['gap']), floor) for r in rows], label="|gap B - A|", color="C3", alpha=0.5)
    if v.get('envelope') is not None:
        ref = s['noise_reference']
        ax3.semilogy(it, np.maximum(v['envelope'], floor), label=f"noise {ref[0]} vs {ref}", color="C2", alpha=0.5)
        ax3.semilogy(it, np.maximum(v['envelope_local'] * s['tolerance'], floor),
                     label=f"{s['tolerance']:g}x noise (local max)", color="C2", linestyle=":")
        ax3.semilogy(it, np.maximum(v['gap_local'], floor), label="gap (local max)", color="C3")
    ax3.set_xlabel("iteration")
    ax3.set_ylabel("loss difference")
    verdict = "agree" if s['agree'] else ("differ" if s['agree'] is False else "not judged")
    ax3.set_title(f"gap vs numerical noise: {verdict}")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
