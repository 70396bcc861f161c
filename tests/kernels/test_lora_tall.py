"""The tall LoRA layout's expand (every slot's shrink folded into the base GEMM) against the torch reference."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.kernels.lora import lora_delta_ref  # noqa: E402
from llmray.kernels.lora_tall import lora_tall_expand, lora_tall_expand_swiglu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tall_case(n, k, seg, o, r, s, dtype, seed=0):
    """x, W_cat = [W ; A] with A (S, G·R, K) stacked slot-major, B (S, O, R), slots (unsorted, some -1)."""
    g = torch.Generator().manual_seed(seed)
    members = len(seg) + 1
    x = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(o, k, generator=g) / k**0.5).to(DEVICE, dtype)
    a = (torch.randn(s, members * r, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(s, o, r, generator=g).to(DEVICE, dtype)
    slots = torch.randint(-1, s, (n,), generator=g, dtype=torch.int32).to(DEVICE)
    scales = (torch.rand(s, generator=g) + 0.5).to(DEVICE)
    return x, torch.cat([w, a.reshape(-1, k)]), a, b, slots, scales


@pytest.mark.parametrize("n,seg,block_o", [(5, (), 16), (37, (32, 48), 16)])
def test_tall_expand_matches_reference_fp32(n, seg, block_o):
    k, r, s = 24, 4, 3
    o = (seg[-1] if seg else 0) + 2 * block_o
    x, w_cat, a, b, slots, scales = _tall_case(n, k, seg, o, r, s, torch.float32)
    full = x @ w_cat.t()  # (N, O + S·G·R)
    out = lora_tall_expand(full, b, slots, scales, len(seg) + 1, seg, block_o=block_o)
    ref = full[:, :o].clone()
    bounds = (0, *seg, o)
    for j in range(len(bounds) - 1):
        lo, hi = bounds[j], bounds[j + 1]
        ref[:, lo:hi] += lora_delta_ref(x, a[:, j * r : (j + 1) * r], b[:, lo:hi], slots, scales)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out[slots < 0], full[slots < 0, :o])  # base rows: the base columns, untouched
    with pytest.raises(ValueError, match="shrink columns"):
        lora_tall_expand(full[:, :-1], b, slots, scales, len(seg) + 1, seg, block_o=block_o)
    with pytest.raises(ValueError, match="member boundaries"):
        lora_tall_expand(full, b, slots, scales, len(seg) + 1, tuple(c + 8 for c in seg) or (8,), block_o)


def _from_full(full, b, slots, scales, bounds, r):
    """The reference the kernels must meet in bf16: base + scale · B @ y with y read from ``full``'s shrink
    columns (the GEMM's bf16 output, as the kernels read it), fp32 math -> (N, O) fp32."""
    n, o, s = full.shape[0], bounds[-1], b.shape[0]
    members = len(bounds) - 1
    y = full[:, o:].float().view(n, s, members, r)
    idx = slots.clamp(min=0).long()
    rows = torch.arange(n, device=full.device)
    out = full[:, :o].float().clone()
    for j in range(members):
        lo, hi = bounds[j], bounds[j + 1]
        yj = y[rows, idx, j] * scales[idx].unsqueeze(1)  # (N, R)
        delta = torch.einsum("nor,nr->no", b[idx][:, lo:hi].float(), yj)
        out[:, lo:hi] += delta * (slots >= 0).unsqueeze(1)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("n", [256, 2048])
def test_tall_expand_bf16_gpu(n):
    # q|k|v-like members at decode and prefill sizes, rows sorted by slot as the runner packs them; the
    # output is rounded to bf16 once (|out| reaches ~16 here: 1 ulp = 0.06), hence the relative tolerance
    seg, k, r, s = (2048, 3072), 1024, 16, 16
    x, w_cat, a, b, slots, scales = _tall_case(n, k, seg, 4096, r, s, torch.bfloat16)
    slots = slots.sort().values
    full = x @ w_cat.t()
    out = lora_tall_expand(full, b, slots, scales, 3, seg)
    ref = _from_full(full, b, slots, scales, (0, *seg, 4096), r)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=5e-2)  # (a wrong slot or member: ~4)
    inter = 3072  # gate|up, the SwiGLU in the same launch
    x, w_cat, a, b, slots, scales = _tall_case(n, k, (inter,), 2 * inter, r, s, torch.bfloat16)
    slots = slots.sort().values
    full = x @ w_cat.t()
    bounds = (0, inter, 2 * inter)
    gate_up = _from_full(full, b, slots, scales, bounds, r)
    g, u = gate_up[:, :inter], gate_up[:, inter:]
    expect = torch.nn.functional.silu(g) * u
    got = lora_tall_expand_swiglu(full, b, slots, scales)
    # elementwise bound from the arithmetic: the dot rounds y·scale to tf32 (2^-11 relative per product, taken
    # as 2^-10), so gate/up are off by <= 2^-10 · Σ|y·scale·B| (sg, su), which silu(gate)·up multiplies by
    # |up| (silu' <= 1.1) and |silu(gate)|; then one bf16 rounding of the output (2^-8 relative). W3: with
    # |up| ~16 a flat atol of 0.05 flagged 4 of 6.3M outputs (0.098 off); a wrong slot/member is off by ~|up|·4
    mag = full.abs()
    mag[:, : 2 * inter] = 0
    sums = _from_full(mag, b.abs(), slots, scales, bounds, r)  # Σ|y·scale·B| per output (scales > 0)
    sg, su = sums[:, :inter], sums[:, inter:]
    bound = 2**-8 * expect.abs() + 2**-10 * (1.1 * u.abs() * sg + g.sigmoid().mul(g).abs() * su) + 1e-3
    excess = (got.float() - expect).abs() - bound
    assert excess.max().item() <= 0, (
        f"{int((excess > 0).sum())} outputs past the bound, worst by {excess.max():.4f}"
    )


def test_tall_expand_swiglu_matches_reference_fp32(n=37):
    # a fused gate|up projection: members gate [0, I) and up [I, 2I), then silu(gate) * up in the same launch
    k, r, s, inter = 24, 4, 3, 40
    x, w_cat, a, b, slots, scales = _tall_case(n, k, (inter,), 2 * inter, r, s, torch.float32)
    full = x @ w_cat.t()
    out = lora_tall_expand_swiglu(full, b, slots, scales, block_o=16)
    gate = full[:, :inter] + lora_delta_ref(x, a[:, :r], b[:, :inter], slots, scales)
    up = full[:, inter : 2 * inter] + lora_delta_ref(x, a[:, r:], b[:, inter:], slots, scales)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shrink columns"):
        lora_tall_expand_swiglu(full[:, :-1], b, slots, scales)


def test_tall_group_linear_and_gate_up_act_match_split(monkeypatch):
    # ShrinkGroup(tall=True): [W ; A] in one GEMM + the tall expand (and the SwiGLU hook) = the split path
    from llmray.lora.layers import LoraBatch, LoRALinear, ShrinkGroup

    if DEVICE == "cpu":
        monkeypatch.setattr(LoRALinear, "use_kernels_on_cpu", True)
    n, k, inter, r, s = 9, 24, 32, 4, 3
    g = torch.Generator().manual_seed(1)
    weights = [(torch.randn(inter, k, generator=g) / k**0.5).to(DEVICE) for _ in range(2)]
    batch = LoraBatch(16, s, torch.device(DEVICE))
    group = ShrinkGroup(weights, s, r, batch, tall=True)
    assert group.w_cat is not None and group.weight is not None
    group.lora_a.copy_(torch.randn(s, 2 * r, k, generator=g))
    group.lora_b.copy_(torch.randn(s, 2 * inter, r, generator=g))  # type: ignore[union-attr]
    batch.scales.copy_(torch.tensor([0.5, 1.0, 2.0]))
    batch.set_rows(torch.tensor([-1, 0, 0, 1, 2, 2, -1, 1, 0], dtype=torch.int32, device=DEVICE))
    batch.enabled = True
    x = torch.randn(n, k, generator=g).to(DEVICE)
    tall = group.linear(x, group.weight)
    batch.tall_max_rows = 0  # the split path: base GEMM, shrink, expand
    split = group.linear(x, group.weight)
    torch.testing.assert_close(tall, split, rtol=1e-4, atol=1e-4)

    def act(gu: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]

    batch.tall_max_rows = 1 << 30
    torch.testing.assert_close(group.gate_up_act(x, group.weight, act), act(split), rtol=1e-4, atol=1e-4)
