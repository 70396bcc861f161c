"""Small per-step host->device transfers without per-step pinned allocations.

``Tensor.pin_memory()`` allocates from PyTorch's caching host allocator, which calls ``cudaHostAlloc``
whenever no cached block is free yet (blocks of steps still in flight are not): a slow call that takes a
driver lock, and a pageable copy makes the stream wait for the device to go idle. Either stalls the host
while the previous step runs, which defeats async scheduling. ``Stager`` owns two pinned arenas that
alternate per step; a step's arrays are packed into its arena (bump allocation) and each moves with one
non-blocking copy. Before an arena is reused its fence (an event recorded after the last copy out of it,
two steps ago) is waited on, which in the steady state has long completed.
"""

from __future__ import annotations

import numpy as np
import torch


class Stager:
    def __init__(self, device: torch.device, nbytes: int = 1 << 21) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.nbytes = nbytes
        n = 2 if self.cuda else 0
        self._arenas = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(n)]
        self._views = [a.numpy() for a in self._arenas]
        self._fences: list[torch.cuda.Event | None] = [None] * n
        self._turn = 0
        self._off = 0

    def begin_step(self) -> None:
        """Switch to the other arena (waiting for its last copies, normally long done)."""
        if not self.cuda:
            return
        self._turn ^= 1
        fence = self._fences[self._turn]
        if fence is not None:
            fence.synchronize()
        self._off = 0

    def end_step(self) -> None:
        """Fence the copies issued out of this step's arena."""
        if self.cuda and self._off:
            fence = torch.cuda.Event()
            fence.record()
            self._fences[self._turn] = fence

    def to_device(
        self, array: np.ndarray | list | tuple, dtype: np.dtype | type | None = None
    ) -> torch.Tensor:
        """A device copy of ``array`` (non-blocking; valid for this step's stream order)."""
        a = np.ascontiguousarray(array, dtype=dtype)
        if not self.cuda:
            return torch.from_numpy(a.copy())
        n = a.nbytes
        start = self._off
        if start + n > self.nbytes:  # a rare oversized step: a one-off pinned copy
            return torch.from_numpy(a.copy()).pin_memory().to(self.device, non_blocking=True)
        self._off = start + ((n + 15) & ~15)  # keep 16-byte alignment
        host = self._views[self._turn][start : start + n]
        host[:] = a.reshape(-1).view(np.uint8)
        pinned = self._arenas[self._turn][start : start + n].view(_TORCH_DTYPES[a.dtype.str]).view(a.shape)
        return pinned.to(self.device, non_blocking=True)


_TORCH_DTYPES = {
    np.dtype(np.float32).str: torch.float32,
    np.dtype(np.int64).str: torch.int64,
    np.dtype(np.int32).str: torch.int32,
    np.dtype(np.bool_).str: torch.bool,
}
