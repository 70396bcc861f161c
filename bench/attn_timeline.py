"""Per-program timelines of the one-launch split-K prefill kernel (``bench/attn_prefix.py --timeline``).

The kernel built with TIMES stamps the global timer (ns) at: 0 program start, 1 tile bounds known, 2 first
K/V step issued / PDL wait passed, 3 partials stored, 4 ticket taken, 5 merge written (the last split only),
6 the loop's first step done, and the SM id. A CUDA graph of the 28 layers is replayed; per layer: the
kernel's span (first start to last stamp), the gap to the next layer's first start (negative: PDL overlap),
the phases' medians over programs.
"""

from __future__ import annotations

import torch


def timeline(case: dict, splits: int, cfg, layers: int) -> dict:
    """Stamps of every program of every layer over one graph replay -> summary (us)."""
    from llmray.kernels.paged_prefill import prefill_split

    n = case["tiles"][0].shape[0]
    progs = splits * 8 * 8 * n  # upper bound of the grid (the launcher may use fewer)
    bufs = [torch.zeros(progs, 8, dtype=torch.int64, device="cuda") for _ in range(layers)]

    def run() -> None:
        for i in range(layers):
            (k, v), (ks, vs) = case["caches"][i], case["scales"][i]
            prefill_split(
                case["q"][i], k, v, case["table"], case["qs"], case["cl"], 128**-0.5, case["outs"][i], None,
                case["tiles"], ks, vs, splits, cfg, times=bufs[i],
            )  # fmt: skip

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        graph.replay()
    for b in bufs:
        b.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return summarize([b.cpu() for b in bufs])


def _med(x: torch.Tensor) -> float:
    return round(float(x.float().median()) / 1000, 3) if x.numel() else -1.0


def summarize(bufs: list[torch.Tensor]) -> dict:
    spans, gaps, phases, spread, per_sm, nprog = [], [], {k: [] for k in range(1, 6)}, [], [], []
    starts, ends = [], []
    for b in bufs:
        b = b[b[:, 0] > 0]
        st = b[:, :6]
        last = st.max(1).values
        starts.append(int(st[:, 0].min()))
        ends.append(int(last.max()))
        nprog.append(b.shape[0])
        spread.append(st[:, 0] - st[:, 0].min())
        per_sm.append(int(torch.bincount(b[:, 7]).max()))
        for k in range(1, 6):
            ok = (st[:, k] > 0) & (st[:, k - 1] > 0)
            phases[k].append(st[ok, k] - st[ok, k - 1])
    for i in range(len(bufs)):
        spans.append(ends[i] - starts[i])
        if i + 1 < len(bufs):
            gaps.append(starts[i + 1] - ends[i])
    mid = slice(1, len(bufs) - 1)
    sp = torch.cat(spread[mid])
    ok = [b[(b[:, 6] > 0) & (b[:, 2] > 0) & (b[:, 3] > 0)] for b in bufs[mid]]
    first = torch.cat([b[:, 6] - b[:, 2] for b in ok])
    rest = torch.cat([b[:, 3] - b[:, 6] for b in ok])
    return {
        "first_loop_step_us": _med(first),
        "rest_loop_store_us": _med(rest),
        "programs": nprog[1],
        "span_us": _med(torch.tensor(spans[mid])),
        "gap_to_next_us": _med(torch.tensor(gaps[1:])),
        "start_spread_us_p50_p90_max": [
            round(float(sp.float().quantile(q)) / 1000, 3) for q in (0.5, 0.9, 1.0)
        ],
        "max_programs_per_sm": max(per_sm),
        "phase_us": {
            name: _med(torch.cat(phases[k][mid]))
            for k, name in enumerate(["bounds", "first_kv", "loop_store", "ticket", "merge"], 1)
        },
    }
