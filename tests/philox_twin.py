r"""A NumPy twin of the compiled kernels' random stream (csrc/common/philox.h).

Philox4x32-10 on arrays of counters, the counter map and the float32 Box-Muller transform,
written independently of the C++ so that the tests compare the kernels against it bit for bit
(up to the ulps of log and sin/cos).
"""

import numpy as np


_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    r"""Philox4x32-10 on arrays of counters (any integer arrays of 32-bit values)."""

    c = [np.asarray(x, dtype=np.uint64) & _MASK for x in (c0, c1, c2, c3)]
    k0, k1 = int(k0) & 0xFFFFFFFF, int(k1) & 0xFFFFFFFF
    for _ in range(10):
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0),
            p1 & _MASK,
            (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1),
            p0 & _MASK,
        ]
        k0 = (k0 + _W0) & 0xFFFFFFFF
        k1 = (k1 + _W1) & 0xFFFFFFFF
    return [x.astype(np.uint32) for x in c]


def numpy_normals(seed, offset, j):
    r"""The normal of every flat index in ``j`` under ``(seed, offset)``, in float64."""

    seed, offset = int(seed) & (2**64 - 1), int(offset) & (2**64 - 1)
    j = np.asarray(j, dtype=np.uint64)
    block, lane = j >> np.uint64(2), (j & np.uint64(3)).astype(np.int64)
    x = philox4x32_10(
        block & _MASK,
        block >> np.uint64(32),
        np.full_like(block, offset & 0xFFFFFFFF),
        np.full_like(block, offset >> 32),
        seed & 0xFFFFFFFF,
        seed >> 32,
    )
    x = np.stack(x, axis=-1)  # (len, 4)
    rows = np.arange(len(j))
    a = x[rows, lane & ~1]  # the radius word of the pair
    b = x[rows, lane | 1]  # the angle word of the pair
    # In float32 as philox.h computes them: k + 0.5 rounds (to even) for k >= 2^23, and u1 can
    # be 1.0 (then the radius is 0).
    u1 = ((a >> 8).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    u2 = ((b >> 8).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    radius = np.sqrt(-2.0 * np.log(u1.astype(np.float64)))
    angle = (np.float32(6.28318530717958647692) * u2).astype(np.float64)
    return np.where(lane % 2 == 0, radius * np.cos(angle), radius * np.sin(angle))
