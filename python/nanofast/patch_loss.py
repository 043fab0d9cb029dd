"""The LM head and its loss in Hugging Face causal language models that nanofast.patch has patched.

GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM and the like compute
`logits = self.lm_head(hidden_states)` (a Linear layer, possibly tied to the input embeddings) and hand
those logits, unchanged, to transformers' causal-LM loss (ForCausalLMLoss: the labels shifted by one,
ignore_index, num_items_in_batch). A model is recognised by exactly that: an `lm_head` Linear, its loss
function transformers' ForCausalLMLoss, and a forward whose source assigns the head's output once and
passes it to `self.loss_function` (Gemma 2's softcapping or Cohere's logit scale change the logits in
between: such a model keeps transformers' loss, with one warning).

While a recognised model trains (model.training and grad mode on) with labels, the pair runs as
nanofast.ops.linear_cross_entropy on the head's input, so the (B*T, vocab) logits are never stored, in
the forward or the backward: the head returns a placeholder (a zero-stride expanded tensor, no memory),
the model's loss function finds that placeholder and computes the fused loss from the head's input and
weight, and the model's output then has `logits` None (left out of a tuple output, as transformers
leaves out every None). Without labels, under no_grad or in eval mode nothing changes: the head
computes the logits and transformers' loss reads them, so generation and evaluation see the logits.

Everything is per model instance: three instance attributes (the model's forward, the head's forward,
the model's loss_function, transformers' own per-instance setting), removed by nanofast.unpatch. The
Parameter objects, tied weights and state_dict stay as they were. transformers is never imported here:
the patched model's own import has loaded it.
"""
import ast
import functools
import inspect
import sys
import textwrap
import threading
import warnings

import torch
import torch.nn.functional as F

from . import nn as nf_nn
from . import ops

_warned = set()


def _causal_lm_loss():
    """transformers' ForCausalLMLoss, or None where transformers is not loaded."""
    loss_utils = sys.modules.get("transformers.loss.loss_utils")
    return getattr(loss_utils, "ForCausalLMLoss", None)


def _head(model):
    """The model's LM head if it is a Linear layer (torch's, or nanofast's in its place), else None."""
    head = getattr(model, "lm_head", None)
    if type(head) in (torch.nn.Linear, nf_nn.Linear) and head.weight.dim() == 2:
        return head
    return None


def _is_causal_lm(model):
    loss = _causal_lm_loss()
    return (loss is not None and _head(model) is not None and "_loss_function" not in model.__dict__
            and getattr(model, "loss_function", None) is loss)


@functools.lru_cache(maxsize=None)
def _why_logits_change(cls):
    """None if cls.forward assigns `self.lm_head(...)` to a name once, never changes it, and passes it
    to `self.loss_function` as its logits; else why not (for the warning)."""
    try:
        forward = inspect.unwrap(cls.forward)
        lines, first = inspect.getsourcelines(forward)
        fn = ast.parse(textwrap.dedent("".join(lines))).body[0]
        me = fn.args.args[0].arg
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return "its forward's source cannot be read"

    def calls(attr):
        return [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and n.func.attr == attr and isinstance(n.func.value, ast.Name) and n.func.value.id == me]

    heads, losses = calls("lm_head"), calls("loss_function")
    assigned = [n.targets[0] for n in ast.walk(fn) if isinstance(n, ast.Assign) and n.value in heads
                and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)]
    if len(heads) != 1 or len(assigned) != 1 or len(losses) != 1:
        return "its forward does not call lm_head once, assign its logits and hand them to loss_function"
    target = assigned[0]
    name = target.id
    for n in ast.walk(fn):
        stored = isinstance(n, ast.Name) and n.id == name and not isinstance(n.ctx, ast.Load)
        in_place = (isinstance(n, (ast.Attribute, ast.Subscript)) and isinstance(n.value, ast.Name)
                    and n.value.id == name and (not isinstance(n.ctx, ast.Load) or getattr(n, "attr", "").endswith("_")))
        if (stored and n is not target) or in_place:
            where = f"{inspect.getsourcefile(forward)}:{first + n.lineno - 1}"
            return f"its forward changes the logits between lm_head and the loss, at {where}"
    loss = losses[0]
    given = loss.args[:1] + [k.value for k in loss.keywords if k.arg == "logits"]
    if not any(isinstance(v, ast.Name) and v.id == name for v in given):
        return "its forward does not hand lm_head's logits to loss_function"
    return None


@functools.lru_cache(maxsize=None)
def _labels_position(cls):
    """Where `labels` stands among the forward's positional arguments (after self), or None if the
    forward takes no labels."""
    try:
        names = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("labels") - 1 if "labels" in names else None


def causal_lm_loss(hidden, weight, bias, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None):
    """transformers' ForCausalLMLoss of the logits hidden @ weight^T + bias, without them: the labels
    shifted by one (or shift_labels as given), ignore_index's rows left out, the mean or, with
    num_items_in_batch, the sum divided by it; float32, as transformers upcasts the logits. In a
    low-precision model the products take the model's dtype as they do in its head."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    x = hidden.reshape(-1, hidden.shape[-1])
    reduction = "mean" if num_items_in_batch is None else "sum"
    device = x.device.type
    if x.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(device):
        with torch.autocast(device, dtype=x.dtype):  # the products in x's dtype, the loss in float32
            loss = ops.linear_cross_entropy(x, weight, target, bias, ignore_index=ignore_index, reduction=reduction)
    else:
        loss = ops.linear_cross_entropy(x, weight, target, bias, ignore_index=ignore_index, reduction=reduction)
    loss = loss.float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _thread_key():
    """The key of this thread's fused call (torch.compile cannot trace threading.get_ident: a compiled
    forward is taken to run on one thread)."""
    return 0 if torch.compiler.is_compiling() else threading.get_ident()


class _Call:
    """One fused forward running on one thread: the head's input, the placeholder it returned, and the
    logits computed after all (where the loss could not be fused), or None."""
    __slots__ = ("hidden", "placeholder", "logits", "fused")

    def __init__(self):
        self.hidden = self.placeholder = self.logits = None
        self.fused = False


class _FusedLoss:
    """What the three hooks of one patched model share. Module-level classes throughout, so that
    patched models still pickle."""

    def __init__(self, model, head, labels_at):
        self.model, self.head, self.labels_at = model, head, labels_at
        # instance forwards that were there before the patch (another library's hooks), or None
        self.previous_forward = model.__dict__.get("forward")
        self.previous_head_forward = head.__dict__.get("forward")
        self.calls = {}  # thread id -> the _Call of the fused forward running on that thread

    # (the class's forward called with the instance: torch.compile resolves type(m).forward.__get__(m)
    # to the instance attribute, this very hook)
    def model_forward(self, *args, **kwargs):
        if self.previous_forward is not None:
            return self.previous_forward(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    def head_forward(self, input):
        if self.previous_head_forward is not None:
            return self.previous_head_forward(input)
        return type(self.head).forward(self.head, input)

    def logits(self, call):
        """The logits of a fused call after all (its loss could not be fused, or never ran)."""
        if call.logits is None:
            call.logits = self.head_forward(call.hidden)
        return call.logits


class _ModelForward:
    """The model's forward: a fused call where it trains with labels, the forward as it was elsewhere."""

    def __init__(self, fused):
        self.fused = fused

    @property
    def __signature__(self):  # the model's own (transformers' Trainer reads it to pick the inputs)
        fused = self.fused
        return inspect.signature(fused.previous_forward or type(fused.model).forward.__get__(fused.model))

    def __call__(self, *args, **kwargs):
        fused = self.fused
        forward = fused.model_forward
        labels = kwargs.get("labels")
        if labels is None and fused.labels_at is not None and len(args) > fused.labels_at:
            labels = args[fused.labels_at]
        if labels is None or not fused.model.training or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        thread = _thread_key()
        outer = fused.calls.get(thread)  # (a model called inside its own forward)
        call = fused.calls[thread] = _Call()
        try:
            out = forward(*args, **kwargs)
        finally:
            if outer is None:
                del fused.calls[thread]
            else:
                fused.calls[thread] = outer
        if call.placeholder is None:  # the head did not run
            return out
        return _with_logits(out, call.placeholder, None if call.fused else fused.logits(call))


def _with_logits(out, placeholder, logits):
    """The model's output with the placeholder replaced by logits, or left out where logits is None
    (a ModelOutput's field None, a tuple without it, as transformers leaves out every None)."""
    if isinstance(out, tuple):
        return tuple(logits if v is placeholder else v for v in out if v is not placeholder or logits is not None)
    if logits is not None:
        for key in [k for k, v in out.items() if v is placeholder]:
            out[key] = logits
        return out
    return type(out)(**{k: v for k, v in out.items() if v is not placeholder})


class _HeadForward:
    """The LM head's forward: in a fused call a placeholder of the logits' shape that takes no memory;
    elsewhere the head's own forward."""

    def __init__(self, fused):
        self.fused = fused

    def __call__(self, input):
        fused = self.fused
        call = fused.calls.get(_thread_key())
        if call is None or call.placeholder is not None:
            return fused.head_forward(input)
        call.hidden = input
        call.placeholder = input.new_zeros(()).expand(*input.shape[:-1], fused.head.weight.shape[0])
        return call.placeholder


class _Loss:
    """The model's loss_function: ForCausalLMLoss's signature; the fused loss where it is handed the
    head's placeholder, transformers' loss elsewhere."""

    def __init__(self, fused):
        self.fused = fused

    def __call__(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                 **kwargs):
        fused = self.fused
        call = fused.calls.get(_thread_key())
        if call is not None and call.placeholder is not None:
            if logits is not call.placeholder:
                raise RuntimeError("nanofast.patch: the model changed the LM head's logits before its loss; "
                                   "patch it with fused_loss=False")
            head = fused.head
            if not call.fused and call.logits is None and vocab_size == head.weight.shape[0]:
                call.fused = True
                return causal_lm_loss(call.hidden, head.weight, head.bias, labels, num_items_in_batch, ignore_index,
                                      shift_labels)
            logits = fused.logits(call)
        return _causal_lm_loss()(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)


def _warn_once(model, reason):
    name = type(model).__name__
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"nanofast.patch: {name}'s LM head and loss stay transformers' ({reason})", stacklevel=4)


def use_for_transformers_model(model):
    """Routes a recognised causal LM's head and loss through linear_cross_entropy (see the module
    docstring); a causal LM that is not recognised keeps its own, with one warning."""
    if isinstance(model.__dict__.get("forward"), _ModelForward) or not _is_causal_lm(model):
        return
    labels_at = _labels_position(type(model))
    reason = "its forward takes no labels" if labels_at is None else _why_logits_change(type(model))
    if reason is not None:
        _warn_once(model, reason)
        return
    head = _head(model)
    fused = _FusedLoss(model, head, labels_at)
    model.forward = _ModelForward(fused)
    head.forward = _HeadForward(fused)
    model.loss_function = _Loss(fused)  # transformers' per-instance setting (model._loss_function)


def restore_transformers_model(model):
    forward = model.__dict__.get("forward")
    if not isinstance(forward, _ModelForward):
        return
    fused = forward.fused
    for module, previous in ((model, fused.previous_forward), (fused.head, fused.previous_head_forward)):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    model.__dict__.pop("_loss_function", None)


def fuses_loss(model):
    """Whether patch has routed this model's LM head and loss (benchmarks label their cases by it)."""
    return isinstance(model.__dict__.get("forward"), _ModelForward)
