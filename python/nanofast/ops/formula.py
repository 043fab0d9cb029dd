"""How an op's one autograd formula is used both ways.

Each op module writes its formula once: `_setup_context(ctx, inputs, output)` keeps what the backward
needs, and `_backward(ctx, *grads)` returns the inputs' gradients by calling `ctx.raw_backward`, the
op's raw backward. The formula then serves

* torch.compile: register_formula makes it the raw forward custom op's autograd, with the raw
  backward custom op as ctx.raw_backward, so the graph records both custom ops;
* eager mode: the op's torch.autograd.Function (_EagerLayerNorm, ...) calls the backend's forward
  launcher, the same _setup_context, and sets ctx.raw_backward to the backend's backward launcher:
  the formula without the custom-op dispatch, which costs as much as the kernels at small shapes.
  With grad mode off (sampling, evaluation) eager_apply runs that Function's forward alone, without
  the autograd node around it, which costs as much again at a decode step's one-row shapes.

Under create_graph=True each formula returns differentiable_grads instead: the same gradients as
a graph, so that double backward is right; the first-order backward stays on the kernels.
"""
import torch


def register_formula(forward_op, backward_op, setup_context, backward):
    """Registers (setup_context, backward) as forward_op's autograd, with backward_op as the raw
    backward."""

    def setup_op_context(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.raw_backward = backward_op

    forward_op.register_autograd(backward, setup_context=setup_op_context)


class _NoAutograd:
    """A ctx for an eager Function's forward run without autograd: what the forward keeps for a
    backward that will not run is dropped."""

    needs_input_grad = ()  # no input's gradient is wanted: any(ctx.needs_input_grad) says whether one is

    def save_for_backward(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def eager_apply(function, *args):
    """function.apply(*args) for an op's eager torch.autograd.Function, or where autograd records
    nothing (grad mode off) its forward alone: the same launcher and the same outputs."""
    if torch.is_grad_enabled():
        return function.apply(*args)
    return function.forward(_NoAutograd(), *args)


def differentiable_grads(reference, inputs, needs, grads):
    """The backward under create_graph=True (autograd runs a backward with grad mode on exactly then):
    the gradients of reference(*inputs), the op recomputed with torch's differentiable functions from
    the saved inputs, as a graph autograd can differentiate again. The kernels' backward returns
    tensors no graph leads to, so a second derivative through them would be silently wrong.

    inputs: the saved tensors (still attached to the caller's graph), or for an input whose value the
    gradients do not depend on (a bias), a stand-in (stand_in); needs: whether each input's gradient
    is wanted, None coming back for the others; grads: the gradients of reference's outputs, None for
    an output that was not used."""
    # Differentiate with respect to views of the inputs: a saved output (add_layer_norm's h) leads back
    # through this very op to its other inputs, and autograd.grad with respect to those inputs
    # themselves would run the op's backward again along that path, which adds nothing.
    inputs = [t.view_as(t) if need else t for t, need in zip(inputs, needs)]
    outputs = reference(*inputs)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
    used = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None]
    wanted = [t for t, need in zip(inputs, needs) if need]
    got = iter(torch.autograd.grad([out for out, _ in used], wanted, [grad for _, grad in used], create_graph=True,
                                   materialize_grads=True))
    return tuple(next(got) if need else None for need in needs)


def stand_in(like, shape, wanted):
    """A zero tensor to recompute an op with in place of an input that was not saved because no
    gradient depends on its value (a bias), when its gradient is wanted; else None."""
    return like.new_zeros(shape).requires_grad_() if wanted else None
