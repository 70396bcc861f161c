"""Prefix-cache block hashes: a 64-bit chain over the blocks' token ids, for a whole prompt in a few numpy calls.

Block i of a sequence hashes to ``H_i = H_{i-1} * P + sum_j t_ij * R_j`` (mod 2^64, R_j random odd), from a
root that depends on the LoRA adapter id: the hash names the whole prefix up to that block. The recurrence
unrolls to ``H_i = P^i * (P * H_{-1} + cumsum_k(c_k * Q^k))`` with Q = P^-1 (P is odd), so a long prompt's
chain is six vectorized uint64 calls instead of a Python loop per block (a prefix hit's lookup is on its
TTFT); one to four blocks (a decode filling a block) take the scalar path, which computes the same values.
A hash only proposes a cached block: the block manager confirms every hit by its exact token ids, adapter
and parent, so a collision (for random odd R_j, about 2^-64 per pair of different blocks) costs a miss,
never wrong K/V.
"""

from __future__ import annotations

from operator import mul

import numpy as np

_M64 = (1 << 64) - 1
_P = 0x9E3779B97F4A7C15  # odd: invertible mod 2^64
_Q = pow(_P, -1, 1 << 64)
_C1 = 0xBF58476D1CE4E5B9  # (splitmix64's first multiplier)
_SMALL = 4  # blocks hashed by the scalar path (numpy's per-call cost dominates below this)


def _mix(x: int) -> int:
    x ^= x >> 31
    x = (x * _C1) & _M64
    return x ^ (x >> 29)


class BlockHasher:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        rng = np.random.default_rng(0x5EED)
        self.r = rng.integers(0, 1 << 62, block_size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.r_list = [int(v) for v in self.r]
        self._ppow = np.ones(0, np.uint64)
        self._qpow = np.ones(0, np.uint64)

    def root(self, adapter_id: int) -> int:
        """The chain's start for a sequence on ``adapter_id`` (0 = the base model)."""
        return _mix((adapter_id * _P + 0x2545F4914F6CDD1D) & _M64)

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._ppow.shape[0] < n:
            size = max(n, 2 * self._ppow.shape[0], 64)
            p, q, ps, qs = 1, 1, [], []
            for _ in range(size):
                ps.append(p)
                qs.append(q)
                p, q = (p * _P) & _M64, (q * _Q) & _M64
            self._ppow, self._qpow = np.array(ps, np.uint64), np.array(qs, np.uint64)
        return self._ppow[:n], self._qpow[:n]

    def chain(self, tokens: list[int] | np.ndarray, parent: int) -> list[int]:
        """Hashes of the blocks of ``tokens`` (a multiple of block_size ids, int64 array or list) following
        the block whose hash is ``parent`` (``root(adapter)`` for a sequence's first block)."""
        bs = self.block_size
        n = len(tokens) // bs
        if n <= _SMALL:
            if isinstance(tokens, np.ndarray):
                tokens = tokens.tolist()
            out, h, r = [], parent, self.r_list
            for i in range(n):
                h = (h * _P + sum(map(mul, tokens[i * bs : (i + 1) * bs], r))) & _M64
                out.append(h)
            return out
        arr = tokens if isinstance(tokens, np.ndarray) else np.array(tokens, np.int64)
        ppow, qpow = self._powers(n)
        s = arr.reshape(n, bs).view(np.uint64) @ self.r  # c_k (n,)
        s *= qpow
        np.cumsum(s, out=s)
        s += np.uint64((parent * _P) & _M64)
        s *= ppow
        return s.tolist()
