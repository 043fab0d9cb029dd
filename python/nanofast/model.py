"""
The GPT model: a GPT-2 style decoder-only transformer, laid out like nanoGPT's model.py.

Read it top to bottom: the two kernels (LayerNorm and causal attention) and where they come from,
then the blocks the model is built of, its configuration, and the model itself with its helpers
(initialisation, loading checkpoints, the optimizer, the FLOP count for MFU, and sampling).

Compatibility with nanoGPT (https://github.com/karpathy/nanoGPT) is part of the design: the modules
carry the same names, so the state_dict keys are identical, the initialisation draws the same random
numbers in the same order, and checkpoints go both ways (`model_args` + `model`).

The one thing that differs is which code runs LayerNorm, attention and GELU (and, on the CPU, the
linear layers, dropout and the optimizer step), chosen by GPTConfig.kernels:

    "nanofast"  nanofast.ops.layer_norm, scaled_dot_product_attention and gelu: fused C++/OpenMP
                kernels for CPU tensors, Triton kernels for CUDA tensors; on the CPU also
                nanofast.nn.Linear (an AVX-512 float32 GEMM), nanofast.nn.Dropout and
                nanofast.optim.AdamW
    "torch"     torch.nn.functional.layer_norm, scaled_dot_product_attention and gelu, nn.Linear,
                nn.Dropout and torch.optim.AdamW, for A/B comparisons
"""

import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanofast import fused_block, generation, ops
from nanofast import nn as nanofast_nn
from nanofast import optim as nanofast_optim

KERNELS = ("nanofast", "torch")


# ---------------------------------------------------------------------------------------------
# The kernels. Both choices share torch's signatures, so the modules below do not care which runs.

def kernel(op, kernels):
    """The function `op` ("layer_norm", "scaled_dot_product_attention" or "gelu") of a kernel choice:
    nanofast.ops or torch.nn.functional, which share the names and signatures."""
    if kernels == "nanofast":
        return getattr(ops, op)
    if kernels == "torch":
        return getattr(F, op)
    raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")


def dropout(p, kernels):
    """A dropout module of a kernel choice: nanofast.nn.Dropout (seeded counter-based masks, on all
    threads; torch's own on CUDA) or torch.nn.Dropout. Either has no weights."""
    return nanofast_nn.Dropout(p) if kernels == "nanofast" else nn.Dropout(p)


def linear(in_features, out_features, bias, kernels):
    """A linear layer of a kernel choice: nanofast.nn.Linear (nanofast's float32 GEMM on CPUs with
    AVX-512) or torch.nn.Linear. Same weights and state_dict keys either way."""
    cls = nanofast_nn.Linear if kernels == "nanofast" else nn.Linear
    return cls(in_features, out_features, bias=bias)


# ---------------------------------------------------------------------------------------------
# Building blocks

class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension, eps=1e-5, with a learned scale and an optional
    learned shift (nn.LayerNorm cannot drop only the shift in older torch versions)."""

    def __init__(self, ndim, bias, kernels="nanofast"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.kernel = kernel("layer_norm", kernels)
        self.fused_add = kernels == "nanofast"

    def forward(self, x):
        return self.kernel(x, self.weight.shape, self.weight, self.bias, 1e-5)

    def add_norm(self, x, delta):
        """(x + delta, the norm of it): a residual update, and the norm that reads the result. nanofast
        fuses the two (nanofast.ops.add_layer_norm); under autocast it hands the normalised rows over in
        the autocast dtype, as the matmul that takes them would cast them anyway."""
        if delta is None:
            return x, self(x)
        if not self.fused_add:
            x = x + delta
            return x, self(x)
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return ops.add_layer_norm(x, delta, self.weight.shape, self.weight, self.bias, 1e-5, out_dtype=out_dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier positions."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # one matmul computes the queries, keys and values of every head at once
        self.c_attn = linear(config.n_embd, 3 * config.n_embd, config.bias, config.kernels)
        # mixes the heads' outputs back into the residual stream
        self.c_proj = linear(config.n_embd, config.n_embd, config.bias, config.kernels)
        # attention dropout happens inside the kernel (dropout_p); these modules hold no weights and
        # exist so that the module tree matches nanoGPT's
        self.attn_dropout = dropout(config.dropout, config.kernels)
        self.resid_dropout = dropout(config.dropout, config.kernels)
        self.kernel = kernel("scaled_dot_product_attention", config.kernels)

    def forward(self, x, cache=None):
        """x (B, T, C). cache (sampling: nanofast.generation.LayerCache): the keys and values of the
        positions before x's, which x's own join."""
        B, T, C = x.shape  # batch, time (sequence position), channels (n_embd)
        hs = C // self.n_head  # head size
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, hs). These are strided views into c_attn's output, not copies:
        # both kernels read them in place.
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        causal = True
        if cache is not None:
            k, v = cache.append(k, v)
            # A prefill (the cache was empty) is causal over its T positions. A step adds one query that
            # sees every cached key: not causal, since both kernels' causal masks are top-left aligned
            # and would show one query row only the first key.
            causal = T > 1
        y = self.kernel(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=causal)
        # (B, n_head, T, hs) -> (B, T, C): the heads side by side again
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class GELU(nn.Module):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF (nn.GELU's default, exact form)."""

    def __init__(self, kernels="nanofast"):
        super().__init__()
        self.kernel = kernel("gelu", kernels)

    def forward(self, x):
        return self.kernel(x)


class MLP(nn.Module):
    """The position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = linear(config.n_embd, 4 * config.n_embd, config.bias, config.kernels)
        self.gelu = GELU(config.kernels)
        self.c_proj = linear(4 * config.n_embd, config.n_embd, config.bias, config.kernels)
        self.dropout = dropout(config.dropout, config.kernels)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One transformer layer, pre-norm: x + attention(norm(x)), then x + mlp(norm(x)).

    Each residual add is followed by a norm (this block's second, or the next block's first), and
    LayerNorm.add_norm does the two at once. So a block takes the MLP update of the block before it as
    `pending`, and hands its own MLP update on the same way: x_out + pending_out is what nanoGPT's
    block returns.

    Where it can (can_run_fused), the block runs as one hand-written autograd node
    (nanofast/fused_block.py) instead of calling its modules. Hooks on the block's modules send it
    through them; global module hooks (torch.nn.modules.module.register_module_forward_hook and
    kin) see the block's own call but not its modules' while it runs fused: torch offers no public
    way to ask whether any are registered. GPT.use_fused_blocks(False) calls every module."""

    # the parameters fused_block.forward takes, in its order (a None where a bias is off)
    FUSED_PARAMETERS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                        "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                        "mlp.c_proj.weight", "mlp.c_proj.bias")

    def _fused_parameters(self):
        """The FUSED_PARAMETERS, read from nn.Module's dictionaries: nn.Module.__getattr__ would cost a
        decode step's one-row kernels as much again. (A name that is not a registered parameter, a
        plain None bias or a tensor put in its place, is read with getattr.)"""
        found = []
        for path, name in _FUSED_PARAMETER_PATHS:
            m = self
            for child in path:
                m = m._modules[child]
            p = m._parameters.get(name, _UNREGISTERED)
            found.append(getattr(m, name) if p is _UNREGISTERED else p)
        return found

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias, kernels=config.kernels)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias, kernels=config.kernels)
        self.mlp = MLP(config)
        self.fused = True  # may run as one hand-written autograd node (see forward); GPT.use_fused_blocks

    def forward(self, x, pending=None, cache=None):
        """(x + pending + attn(...), mlp(...)), as the class says. cache (sampling, grad mode off:
        nanofast.generation.LayerCache): the keys and values of the positions before x's."""
        if self.fused and self.can_run_fused(x, pending) and (cache is None or not torch.is_grad_enabled()):
            # the same computation as the lines below, as one autograd node (nanofast/fused_block.py)
            p = self.attn.dropout if self.training else 0.0
            return fused_block.forward(x, pending, self.attn.n_head, p, *self._fused_parameters(), cache=cache)
        x, h = self.ln_1.add_norm(x, pending)  # x = x + pending; h = ln_1(x)
        x, h = self.ln_2.add_norm(x, self.attn(h, cache))  # x = x + attn(h); h = ln_2(x)
        return x, self.mlp(h)

    def can_run_fused(self, x, pending):
        """True when fused_block.forward computes what the modules would: the model's own modules with
        the nanofast kernels and no hooks, CPU tensors, eager mode, and dtypes the C++ kernels take."""
        if not self.ln_1.fused_add or x.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        dtype = self.ln_1.weight.dtype
        if x.dtype != dtype or dtype not in (torch.float32, torch.float64):
            return False
        if fused_block.compute_dtype(x) not in (dtype, torch.bfloat16) or x.dim() != 3 or x.shape[-1] % self.attn.n_head:
            return False
        if pending is not None and (pending.shape != x.shape or pending.device != x.device):
            return False
        for path, cls in _FUSED_MODULES:
            m = self
            for name in path:  # children read from _modules: nn.Module.__getattr__ is slower, on every forward
                m = m._modules.get(name)
                if m is None:
                    return False
            if type(m) is not cls or _has_hooks(m):
                return False
        return True


def _has_hooks(module):
    """Whether a hook is registered on this module itself. torch has no public query for this; these
    are the dictionaries nn.Module keeps a module's hooks in."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


# Block.FUSED_PARAMETERS as (module path, parameter name)
_FUSED_PARAMETER_PATHS = tuple((tuple(n.split(".")[:-1]), n.split(".")[-1]) for n in Block.FUSED_PARAMETERS)
_UNREGISTERED = object()

# (path, class) of the modules whose forward fused_block replaces: the model's own classes, not a
# replacement such as a patched or adapter-wrapped layer
_FUSED_MODULES = (((), Block), (("ln_1",), LayerNorm), (("attn",), CausalSelfAttention),
                  (("attn", "c_attn"), nanofast_nn.Linear), (("attn", "c_proj"), nanofast_nn.Linear),
                  (("attn", "attn_dropout"), nanofast_nn.Dropout), (("attn", "resid_dropout"), nanofast_nn.Dropout),
                  (("ln_2",), LayerNorm), (("mlp",), MLP), (("mlp", "c_fc"), nanofast_nn.Linear),
                  (("mlp", "gelu"), GELU), (("mlp", "c_proj"), nanofast_nn.Linear),
                  (("mlp", "dropout"), nanofast_nn.Dropout))


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model reads (size of the position embedding)
    vocab_size: int = 50304  # GPT-2's 50257 tokens, rounded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the Linear and LayerNorm layers (GPT-2 has them)
    kernels: str = "nanofast"  # who runs LayerNorm and attention: "nanofast" or "torch"

    def __post_init__(self):
        if self.kernels not in KERNELS:
            raise ValueError(f"GPTConfig.kernels must be one of {KERNELS}, got {self.kernels!r}")


# The fields of nanoGPT's own GPTConfig: what a checkpoint's `model_args` may hold for nanoGPT to
# load it (`kernels` is nanofast's and lives in the checkpoint's `config` instead).
NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


# ---------------------------------------------------------------------------------------------
# The model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        # The construction order below fixes the order in which the initialisers draw random numbers;
        # it is nanoGPT's, so the same seed gives the same initial weights there and here.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            drop=dropout(config.dropout, config.kernels),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias, kernels=config.kernels),
        ))
        self.lm_head = linear(config.n_embd, config.vocab_size, False, config.kernels)
        # Weight tying: the output projection reuses the token embedding matrix. The state_dict still
        # lists both names (one tensor), as nanoGPT's does.
        self.transformer.wte.weight = self.lm_head.weight
        self.fused_loss = True  # lm_head and the loss in chunks where it can (use_fused_loss)

        # Initialisation: N(0, 0.02) for every Linear and Embedding weight, zero biases; then the
        # projections that write into the residual stream (attn.c_proj, mlp.c_proj) get their std
        # divided by sqrt(2 * n_layer), since 2 * n_layer of them add up along the stream (GPT-2 paper).
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def use_fused_blocks(self, enabled=True):
        """Whether the blocks may run as one hand-written autograd node each (nanofast/fused_block.py:
        nanofast kernels on the CPU, eager mode). The results are the per-op blocks'; off, autograd
        records every op, for hooks added later or for comparisons. Returns self."""
        for block in self.transformer.h:
            block.fused = bool(enabled)
        return self

    def get_num_params(self, non_embedding=True):
        """Parameter count. By default without the position embeddings (the token embeddings stay in:
        being tied to lm_head, they do work as output weights)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def use_fused_loss(self, enabled=True):
        """Whether forward, given targets, computes lm_head and the loss together with
        nanofast.ops.linear_cross_entropy (kernels='nanofast', CPU tensors, lm_head the model's own
        without hooks): a chunk of rows at a time, so the (B, T, vocab) logits are never stored, and
        forward returns None in their place. Off: nanoGPT's (logits, loss). Returns self."""
        self.fused_loss = bool(enabled)
        return self

    def _fuses_loss(self, x):
        head = self.lm_head
        return (self.fused_loss and self.config.kernels == "nanofast" and x.is_cpu
                and type(head) is nanofast_nn.Linear and not _has_hooks(head))

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids. With targets (B, T): (logits (B, T, vocab), the mean cross-entropy),
        targets of -1 ignored; where the loss is fused (use_fused_loss, on by default with nanofast's
        kernels on the CPU) the logits are not computed and come back as None. Without targets: the
        logits of the last position only, (B, 1, vocab), and None."""
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence of length {T} is longer than block_size {self.config.block_size}"
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        pending = None  # each block's MLP update, added to x by the norm that reads it next
        for block in self.transformer.h:
            x, pending = block(x, pending)
        x = self.transformer.ln_f.add_norm(x, pending)[1]
        if targets is None:
            # generating: only the next token's distribution is needed ([-1] keeps the time axis)
            return self.lm_head(x[:, [-1], :]), None
        if self._fuses_loss(x):
            head = self.lm_head
            return None, ops.linear_cross_entropy(x, head.weight, targets, head.bias, ignore_index=-1)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context length (e.g. GPT-2's 1024 for a small fine-tuning run): keep the first
        block_size position embeddings."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    # -----------------------------------------------------------------------------------------
    # Loading weights

    @staticmethod
    def clean_state_dict(state_dict):
        """A checkpoint's state dict in our key space: torch.compile's '_orig_mod.' and DDP's 'module.'
        prefixes removed, and the causal-mask buffers ('attn.bias') of pre-flash-attention nanoGPT
        versions dropped (they are not weights)."""
        out = {}
        for key, value in state_dict.items():
            for prefix in ("_orig_mod.", "module."):
                while key.startswith(prefix):
                    key = key[len(prefix):]
            if key.endswith(".attn.bias") or key.endswith(".attn.masked_bias"):
                continue
            out[key] = value
        return out

    def load_nanogpt_state_dict(self, state_dict):
        """load_state_dict for a nanoGPT/nanofast state dict, with an error that says what does not fit."""
        from nanofast.checkpoint import CheckpointError
        sd = self.clean_state_dict(state_dict)
        own = self.state_dict()
        problems = []
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        wrong = [f"{k} {tuple(sd[k].shape)} (model: {tuple(own[k].shape)})"
                 for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong)):
            if items:
                shown = ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
                problems.append(f"{label}: {shown}")
        if problems:
            raise CheckpointError("the checkpoint's weights do not fit a GPT built from its model_args; "
                                  + "; ".join(problems))
        self.load_state_dict(sd)

    @classmethod
    def from_checkpoint(cls, checkpoint, kernels="nanofast", override_args=None, map_location="cpu",
                        weights_only=True):
        """A GPT from a nanoGPT or nanofast checkpoint, given as a path or as the loaded dict.

        Uses the checkpoint's `model_args` (GPTConfig fields) and `model` (state dict).
        override_args: GPTConfig fields to change, e.g. dict(dropout=0.0) for inference.
        """
        from nanofast.checkpoint import load_checkpoint, validate_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = load_checkpoint(checkpoint, map_location=map_location, weights_only=weights_only)
        validate_checkpoint(checkpoint)
        known = {f.name for f in fields(GPTConfig)}
        args = {k: v for k, v in checkpoint["model_args"].items() if k in known}
        args["kernels"] = kernels
        args.update(override_args or {})
        model = cls(GPTConfig(**args))
        model.load_nanogpt_state_dict(checkpoint["model"])
        return model

    GPT2_SIZES = {
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    }

    @classmethod
    def from_pretrained(cls, model_type, override_args=None, kernels="nanofast"):
        """OpenAI's GPT-2 weights, downloaded through huggingface transformers (needs the network)."""
        if model_type not in cls.GPT2_SIZES:
            raise ValueError(f"unknown GPT-2 model {model_type!r}; one of {sorted(cls.GPT2_SIZES)}")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise ImportError(f"init_from={model_type!r} needs the `transformers` package "
                              "(pip install transformers) and network access") from None
        print(f"loading weights from pretrained gpt: {model_type}")
        hf_state = GPT2LMHeadModel.from_pretrained(model_type).state_dict()
        return cls.from_hf_state_dict(hf_state, model_type, override_args, kernels)

    @classmethod
    def from_hf_state_dict(cls, hf_state, model_type, override_args=None, kernels="nanofast"):
        """A GPT from the state dict of huggingface's GPT2LMHeadModel."""
        override_args = dict(override_args or {})
        if set(override_args) - {"dropout"}:
            raise ValueError("only dropout can be overridden for pretrained GPT-2 weights")
        # every GPT-2 checkpoint: 50257 tokens, 1024 positions, biases
        config = GPTConfig(**cls.GPT2_SIZES[model_type], vocab_size=50257, block_size=1024, bias=True,
                           kernels=kernels, **override_args)
        model = cls(config)
        ours = model.state_dict()
        theirs = {k: v for k, v in hf_state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if set(theirs) != set(ours):
            raise ValueError(f"GPT-2 state dict does not match: {sorted(set(theirs) ^ set(ours))[:6]}")
        # OpenAI's checkpoints store these projections as Conv1D weights, i.e. transposed
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k, v in theirs.items():
                v = v.t() if k.endswith(conv1d) else v
                if v.shape != ours[k].shape:
                    raise ValueError(f"{k}: shape {tuple(v.shape)}, expected {tuple(ours[k].shape)}")
                ours[k].copy_(v)
        return model

    # -----------------------------------------------------------------------------------------
    # Training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on the matrices (Linear weights, embeddings) and none on the vectors
        (biases, LayerNorm scales): param_groups[0] decays, param_groups[1] does not. With
        kernels='nanofast' on the CPU, nanofast.optim.AdamW (one C++ call per step, gradient clipping
        fused in); otherwise torch's fused implementation where it accepts the parameters (CUDA; the CPU
        since torch 2.4), the default one elsewhere. Prints nothing: nanofast.training.describe_optimizer
        gives what nanoGPT's version prints."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if self.config.kernels == "nanofast" and device_type == "cpu" and nanofast_optim.AdamW.supports(params):
            return nanofast_optim.AdamW(groups, lr=learning_rate, betas=betas)
        if "fused" in inspect.signature(torch.optim.AdamW).parameters:
            try:
                return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)
            except (RuntimeError, ValueError):
                pass  # e.g. a device torch has no fused kernel for
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def flops_per_token(self):
        """FLOPs of one token's forward and backward pass: 6 per parameter, plus attention's
        12 * n_layer * n_head * head_size * block_size (the PaLM paper's estimate, appendix B)."""
        cfg = self.config
        head_size = cfg.n_embd // cfg.n_head
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_head * head_size * cfg.block_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation: the FLOP/s achieved by `fwdbwd_per_iter` sequences of block_size
        tokens in `dt` seconds, as a fraction of `peak_flops`. The default, an A100's bfloat16 peak,
        is nanoGPT's; nanofast-train passes this device's measured peak (nanofast.metrics.peak_flops)."""
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Extend idx (B, T) by max_new_tokens tokens, one at a time, each drawn from the model's
        distribution given the last block_size tokens. temperature scales the logits (0 = always the
        most likely token); top_k keeps only the k most likely tokens. Call model.eval() first.

        use_cache keeps the keys and values of the context, so that each new token reads only itself
        (nanofast/generation.py); use_cache=False recomputes the whole context for every token. The
        same seed draws the same tokens either way."""
        return generation.generate(self, idx, max_new_tokens, temperature, top_k, use_cache)
