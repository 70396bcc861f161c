"""The one-launch LoRA delta (shrink recomputed per output tile + expand) against the torch reference
(interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.kernels.lora import lora_delta_ref  # noqa: E402
from llmray.kernels.lora_fused import lora_delta  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, base, a, b, slots, scales, bounds):
    """base + member j's delta in output columns [bounds[j], bounds[j+1]) (fp32)."""
    r = a.shape[1] // (len(bounds) - 1)
    ref = base.float().clone()
    for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        ref[:, lo:hi] += lora_delta_ref(x, a[:, j * r : (j + 1) * r], b[:, lo:hi], slots, scales)
    return ref


@pytest.mark.parametrize(
    # (rows, K, O bounds, rank, slots, sorted rows, config): T=2 with unsorted rows runs the rare per-slot
    # loop (more than T slots in a tile); K and O not multiples of the tiles; rank 4 < BLOCK_R
    "n,k,bounds,r,s,sort,config",
    [
        (24, 48, (0, 32, 64, 96), 4, 5, True, (16, 32, 32, 2, 4, 1)),
        (21, 72, (0, 70), 8, 6, False, (16, 32, 32, 2, 4, 1)),
        (9, 40, (0, 32, 64), 16, 3, True, (16, 32, 16, 1, 4, 1)),
    ],
)
def test_lora_delta_matches_reference_fp32(n, k, bounds, r, s, sort, config):
    g = torch.Generator().manual_seed(0)
    o, members = bounds[-1], len(bounds) - 1
    x = torch.randn(n, k, generator=g).to(DEVICE)
    base = torch.randn(n, o, generator=g).to(DEVICE)
    a = (torch.randn(s, members * r, k, generator=g) / k**0.5).to(DEVICE)
    b = torch.randn(s, o, r, generator=g).to(DEVICE)
    slots = torch.randint(-1, s, (n,), generator=g, dtype=torch.int32)
    slots = (slots.sort().values if sort else slots).to(DEVICE)
    scales = (torch.rand(s, generator=g) + 0.5).to(DEVICE)
    out = lora_delta(x, a, b, slots, scales, base.clone(), seg=tuple(bounds[1:-1]), config=config)
    torch.testing.assert_close(out, _reference(x, base, a, b, slots, scales, bounds), rtol=1e-4, atol=1e-4)
    assert torch.equal(out[slots < 0], base[slots < 0])  # base rows get no delta at all


def test_lora_delta_reads_b_through_member_strides_and_rejects_bad_bounds():
    # the wide layout: w_ext = [W | member 0's B (O, S*R) | member 1's B]; the kernel reads each member's B as
    # a strided view of it (what ShrinkGroup passes)
    g = torch.Generator().manual_seed(1)
    n, k, r, s, bounds = 11, 48, 4, 3, (0, 32, 64)
    o = bounds[-1]
    w_ext = torch.zeros(o, k + 2 * s * r)
    b = [torch.randn(s, 32, r, generator=g) for _ in range(2)]
    for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        c = k + j * s * r
        w_ext[lo:hi, c : c + s * r].view(hi - lo, s, r).copy_(b[j].permute(1, 0, 2))
    w_ext = w_ext.to(DEVICE)
    b0 = w_ext[:, k : k + s * r].view(o, s, r).permute(1, 0, 2)  # (S, O, R) strided, member 0's layout
    x = torch.randn(n, k, generator=g).to(DEVICE)
    base = torch.randn(n, o, generator=g).to(DEVICE)
    a = (torch.randn(s, 2 * r, k, generator=g) / k**0.5).to(DEVICE)
    slots = torch.randint(-1, s, (n,), generator=g, dtype=torch.int32).sort().values.to(DEVICE)
    scales = (torch.rand(s, generator=g) + 0.5).to(DEVICE)
    cfg = (16, 32, 16, 2, 4, 1)
    out = lora_delta(x, a, b0, slots, scales, base.clone(), seg=(32,), member_stride=s * r, config=cfg)
    ref = _reference(x, base, a, torch.cat(b, 1).to(DEVICE), slots, scales, bounds)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="member boundaries"):
        lora_delta(x, a, b0, slots, scales, base.clone(), seg=(40,), config=cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("n", [256, 200])
def test_lora_delta_bf16_decode_shapes_gpu(n):
    # qwen3-0.6b's fused q|k|v (1024 -> 2048|1024|1024) and down (3072 -> 1024), 16 adapters rank 16, rows
    # sorted by slot with base rows, default configs
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, bounds in ((1024, (0, 2048, 3072, 4096)), (3072, (0, 1024))):
        o, members = bounds[-1], len(bounds) - 1
        x = torch.randn(n, k, device="cuda", generator=g).bfloat16()
        base = torch.randn(n, o, device="cuda", generator=g).bfloat16()
        a = (torch.randn(16, members * 16, k, device="cuda", generator=g) / k**0.5).bfloat16()
        b = (torch.randn(16, o, 16, device="cuda", generator=g) * 0.1).bfloat16()
        slots = torch.randint(-1, 16, (n,), device="cuda", generator=g, dtype=torch.int32).sort().values
        scales = torch.full((16,), 2.0, device="cuda")
        out = lora_delta(x, a, b, slots, scales, base.clone(), seg=tuple(bounds[1:-1]))
        ref = _reference(x, base, a, b, slots, scales, bounds)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
