"""Reference implementation of the attention-dropout mask, written from the generator's description.

Philox4x32 with 10 rounds, as Triton's ``tl.rand`` computes it: key = (low, high) 32 bits of the seed,
counter = (low, high) 32 bits of the element's offset, 0, 0; the first output word is read as int32,
a negative value replaced by its bitwise NOT, and scaled by 4.6566127342e-10 (float32 arithmetic).

The offset of element (b, h, i, j) of a (B, H, Tq, Tk) score matrix is ((b*H + h)*Tq + i)*Tk + j, and
the element is kept iff its uniform is >= p. Both the C++ and the Triton kernels must agree with this.
"""
import numpy as np

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint32(0x9E3779B9)
_W1 = np.uint32(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox_first_word(seed: int, offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.uint64)
    c0 = (offsets & _MASK32).astype(np.uint32)
    c1 = (offsets >> np.uint64(32)).astype(np.uint32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint32(seed & 0xFFFFFFFF)
    k1 = np.uint32((seed >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for _ in range(10):
            p1 = c2.astype(np.uint64) * _M1  # full 64-bit products
            p0 = c0.astype(np.uint64) * _M0
            c0, c1, c2, c3 = (
                (p1 >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0,
                (p1 & _MASK32).astype(np.uint32),
                (p0 >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1,
                (p0 & _MASK32).astype(np.uint32),
            )
            k0 = np.uint32((int(k0) + int(_W0)) & 0xFFFFFFFF)
            k1 = np.uint32((int(k1) + int(_W1)) & 0xFFFFFFFF)
    return c0


def uniform(seed: int, offsets: np.ndarray) -> np.ndarray:
    x = philox_first_word(seed, offsets).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def dropout_mask_ref(seed: int, batch: int, heads: int, q_len: int, k_len: int, p: float) -> np.ndarray:
    """bool array (B, H, Tq, Tk): True where the element is kept."""
    n = batch * heads * q_len * k_len
    u = uniform(seed, np.arange(n, dtype=np.uint64))
    return (u >= np.float32(p)).reshape(batch, heads, q_len, k_len)
