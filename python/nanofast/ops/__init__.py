"""Fused kernels as torch ops: CPU tensors run C++/OpenMP, CUDA tensors run Triton.

Each op is a torch.library custom op (namespace ``nanofast``) with autograd and a fake
implementation, so it works in eager mode, under autograd and inside torch.compile. How the pieces
fit: backend.py (what a backend provides, and cpu.py / cuda.py, the two backends), checks.py (the
argument checks), seed.py (dropout seeds), and one module per op with its custom ops and its one
autograd formula.
"""
from .add_layer_norm import add_layer_norm
from .attention import dropout_mask, scaled_dot_product_attention
from .checks import UnsupportedArgument
from .dropout import dropout
from .gelu import gelu
from .glu import geglu, swiglu
from .layer_norm import layer_norm
from .linear import linear
from .linear_cross_entropy import linear_cross_entropy
from .rms_norm import add_rms_norm, rms_norm
from .rotary import apply_rotary_pos_emb

__all__ = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "scaled_dot_product_attention", "dropout_mask",
           "gelu", "swiglu", "geglu", "apply_rotary_pos_emb", "dropout", "linear", "linear_cross_entropy",
           "UnsupportedArgument"]
