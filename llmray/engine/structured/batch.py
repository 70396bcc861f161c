"""A step's constraint masks in one call: ``fill_bitmasks(bitmask, rows)``.

The runner hands every constrained row of a step at once. Rows whose constraint class offers a
``fill_bitmasks(bitmask, rows) -> {row: why}`` classmethod (llguidance: one call fills all its rows on
parallel threads without the GIL) are filled by one call per class; any other ``TokenConstraint`` (xgrammar's,
a test's) fills its row with ``fill_bitmask``. A row that fails is reported (row -> why), never raised, so that
its request fails alone; its mask row is then reset to all ones by the caller. ``usable_cpus()``: the CPUs this
process may run on (its affinity, not the machine's count), which sizes the grammar libraries' thread pools.
"""

from __future__ import annotations

import logging
import os

import torch

from llmray.engine.sequence import TokenConstraint

logger = logging.getLogger("llmray.engine")


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (a container or ``taskset`` may grant fewer than
    the machine has), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (no affinity call on this platform)
        return max(1, os.cpu_count() or 1)


def fill_bitmasks(bitmask: torch.Tensor, rows: list[tuple[int, TokenConstraint]]) -> dict[int, str]:
    """Fill ``bitmask[r]`` (host int32 (R, ceil(V/32)), contiguous; a row's old content is overwritten) for
    every ``(r, constraint)``. Returns row -> why for the rows whose constraint failed. A constraint class
    whose fill writes every word (``fills_whole_row = True``: llguidance, xgrammar) gets the row as it is;
    any other gets it reset to all ones first, as ``TokenConstraint.fill_bitmask`` promises."""
    failed: dict[int, str] = {}
    batched: dict[type, list[tuple[int, TokenConstraint]]] = {}
    for r, c in rows:
        if hasattr(type(c), "fill_bitmasks"):
            batched.setdefault(type(c), []).append((r, c))
            continue
        try:
            if not getattr(c, "fills_whole_row", False):
                bitmask[r] = -1  # the protocol: the row arrives all ones
            c.fill_bitmask(bitmask, r)
        except Exception as e:  # this request's constraint is broken: it fails alone
            failed[r] = f"its token constraint failed: {e!r}"
    for cls, group in batched.items():
        try:
            failed.update(cls.fill_bitmasks(bitmask, group))  # type: ignore[attr-defined]  # checked above
        except Exception as e:  # the batch call broke: find the row(s) one by one
            logger.warning("batched mask fill failed (%r); filling row by row", e)
            for r, c in group:
                try:
                    bitmask[r] = -1
                    c.fill_bitmask(bitmask, r)
                except Exception as e_row:
                    failed[r] = f"its token constraint failed: {e_row!r}"
    return failed
