"""How an op's one autograd formula is used both ways.

Each op module writes its formula once: `_setup_context(ctx, inputs, output)` keeps what the backward
needs, and `_backward(ctx, *grads)` returns the inputs' gradients by calling `ctx.raw_backward`, the
op's raw backward. The formula then serves

* torch.compile: register_formula makes it the raw forward custom op's autograd, with the raw
  backward custom op as ctx.raw_backward, so the graph records both custom ops;
* eager mode: the op's torch.autograd.Function (_EagerLayerNorm, ...) calls the backend's forward
  launcher, the same _setup_context, and sets ctx.raw_backward to the backend's backward launcher:
  the formula without the custom-op dispatch, which costs as much as the kernels at small shapes.
"""


def register_formula(forward_op, backward_op, setup_context, backward):
    """Registers (setup_context, backward) as forward_op's autograd, with backward_op as the raw
    backward."""

    def setup_op_context(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.raw_backward = backward_op

    forward_op.register_autograd(backward, setup_context=setup_op_context)
