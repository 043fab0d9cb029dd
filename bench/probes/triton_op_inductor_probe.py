"""Compiles each nanofast CUDA op under inductor (torch.compile, fullgraph) on its own, forward and
backward, and prints the whole error of any that fails: a user Triton kernel that compiles when
launched directly can still fail inside inductor, which compiles its own copy of the kernel."""
import traceback

import torch

import nanofast.ops as ops


def case(name, fn, *shapes, dtype=torch.bfloat16):
    torch._dynamo.reset()
    args = [torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True) for s in shapes]
    try:
        out = torch.compile(fn, fullgraph=True)(*args)
        out.float().sum().backward()
        torch.cuda.synchronize()
        print(f"OK   {name}", flush=True)
    except Exception as e:
        print(f"FAIL {name}: {type(e).__name__}", flush=True)
        print("".join(traceback.format_exception_only(type(e), e))[-6000:], flush=True)


if __name__ == "__main__":
    C = 384
    case("layer_norm fwd+bwd", lambda x, w: ops.layer_norm(x, (C,), w), (4096, C), (C,))
    case("layer_norm float32", lambda x, w: ops.layer_norm(x, (C,), w), (4096, C), (C,), dtype=torch.float32)
    case("add_layer_norm", lambda x, r, w: sum(ops.add_layer_norm(x, r, (C,), w)), (8, 512, C), (8, 512, C), (C,))
    case("attention causal", lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
         (4, 6, 256, 64), (4, 6, 256, 64), (4, 6, 256, 64))
    case("attention dropout", lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              dropout_p=0.2),
         (4, 6, 256, 64), (4, 6, 256, 64), (4, 6, 256, 64))
