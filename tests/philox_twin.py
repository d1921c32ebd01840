r"""A NumPy twin of the compiled kernels' random stream (csrc/common/philox.h).

Philox4x32-10 on arrays of counters, the key of a salted seed, the counter map and the float32
Box-Muller transform, written independently of the C++ so that the tests compare the kernels
against it (up to the ulps of log, sqrt and sinpi / cospi). It also lays out the counters of
PyTorch's own CUDA random ops (curand_init(seed, thread, offset)), to show that fastbnf's never
coincide with them.
"""

import numpy as np


_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = np.uint64(0xFFFFFFFF)
_MASK64 = (1 << 64) - 1

SALT_MIX = 0x9E3779B97F4A7C15
KEY_DOMAIN = 0x66617374626E6621  # "fastbnf!"


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


def fold_salt(seed: int, salt: int) -> int:
    return (int(seed) ^ (int(salt) * SALT_MIX)) & _MASK64


def philox_key(salted_seed: int) -> int:
    r"""The Philox key of a salted seed: splitmix64's finalizer of ``seed ^ KEY_DOMAIN``."""

    z = (int(salted_seed) & _MASK64) ^ KEY_DOMAIN
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def philox_words(key: int, counters) -> np.ndarray:
    r"""The 4 words of Philox4x32-10 under a 64-bit key for an array of 4-word counters,
    shaped ``(len, 4)``."""

    c = np.asarray(counters, dtype=np.uint64)
    return np.stack(philox4x32_10(*c.T, key & 0xFFFFFFFF, key >> 32), axis=-1)


def fastbnf_counters(blocks, offset: int) -> np.ndarray:
    r"""fastbnf's counters: the block in words 0-1, the offset in words 2-3."""

    blocks = np.asarray(blocks, dtype=np.uint64)
    offset = np.uint64(offset)
    return np.stack(
        [
            blocks & _MASK,
            blocks >> np.uint64(32),
            np.full_like(blocks, offset & _MASK),
            np.full_like(blocks, offset >> np.uint64(32)),
        ],
        axis=-1,
    )


def curand_counters(threads, offset: int) -> np.ndarray:
    r"""The counters of ``curand_init(seed, thread, offset)`` (PyTorch's CUDA random ops): the
    offset / 4 in words 0-1, the thread (subsequence) in words 2-3, keyed by the seed itself."""

    threads = np.asarray(threads, dtype=np.uint64)
    block = np.uint64(offset // 4)
    return np.stack(
        [
            np.full_like(threads, block & _MASK),
            np.full_like(threads, block >> np.uint64(32)),
            threads & _MASK,
            threads >> np.uint64(32),
        ],
        axis=-1,
    )


def numpy_normals(seed, offset, j):
    r"""The normal of every flat index in ``j`` under ``rng_state = (seed, offset)``, in
    float64."""

    key = philox_key(int(seed))
    j = np.asarray(j, dtype=np.uint64)
    block, lane = j >> np.uint64(2), (j & np.uint64(3)).astype(np.int64)
    x = philox_words(key, fastbnf_counters(block, int(offset) & _MASK64))
    rows = np.arange(len(j))
    a = x[rows, lane & ~1]  # the radius word of the pair
    b = x[rows, lane | 1]  # the angle word of the pair
    # In float32 as philox.h computes them: k + 0.5 rounds (to even) for k >= 2^23, and u1 can
    # be 1.0 (then the radius is 0). The angle is in half-turns, x = 2 u2, exact.
    u1 = ((a >> 8).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    u2 = ((b >> 8).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    radius = np.sqrt(-2.0 * np.log(u1.astype(np.float64)))
    angle = np.pi * (np.float32(2.0) * u2).astype(np.float64)
    return np.where(lane % 2 == 0, radius * np.cos(angle), radius * np.sin(angle))
