"""Training's fused q/k RMSNorm + rope (forward and backward) against the unfused torch reference."""

from __future__ import annotations

import pytest
import torch

from llmray.kernels.qk_norm_rope_train import qk_norm_rope_train
from llmray.kernels.reference import rms_norm_ref, rope_ref


@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float32, 12)], ids=str)
def test_forward_and_gradients_match_reference(dtype, d, device, assert_matches):
    """d = 12: not a power of 2, so the unfused ops run (same results)."""
    g = torch.Generator().manual_seed(0)
    b, t, hq, hk = 2, 5, 4, 2
    q = torch.randn(b, t, hq, d, generator=g).to(device, dtype).requires_grad_(True)
    k = torch.randn(b, t, hk, d, generator=g).to(device, dtype).requires_grad_(True)
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(device).requires_grad_(True)  # fp32 weights (autocast)
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(device).requires_grad_(True)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 9, 0, 1]], device=device)
    ang = torch.outer(torch.arange(16.0), torch.rand(d // 2, generator=g))
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    dq, dk = (
        torch.randn(b, t, hq, d, generator=g).to(device, dtype),
        torch.randn(b, t, hk, d, generator=g).to(device, dtype),
    )
    qo, ko = qk_norm_rope_train(q, k, qw, kw, 1e-6, positions, cos, sin)
    torch.autograd.backward((qo, ko), (dq, dk))
    refs = [x.detach().float().requires_grad_(True) for x in (q, k, qw, kw)]
    qr, kr = rope_ref(
        rms_norm_ref(refs[0], refs[2], 1e-6), rms_norm_ref(refs[1], refs[3], 1e-6), positions, cos, sin
    )
    torch.autograd.backward((qr, kr), (dq.float(), dk.float()))
    assert qo.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    assert_matches(qo, qr, dtype, "q")
    assert_matches(ko, kr, dtype, "k")
    for x, r, name in zip((q, k), refs[:2], ("dq", "dk"), strict=True):
        assert_matches(x.grad, r.grad, dtype, name)
    for x, r, name in zip((qw, kw), refs[2:], ("dqw", "dkw"), strict=True):
        assert_matches(x.grad, r.grad, torch.float32 if dtype == torch.float32 else dtype, name, reduced=True)


@pytest.mark.parametrize(
    "dtype,bwd,bt,copy_v,hg,prefetch",
    [
        (torch.bfloat16, "token", 0, False, 0, False),
        (torch.bfloat16, "rows", 4, True, 0, False),
        (torch.float32, "rows", 8, False, 0, False),
        (torch.bfloat16, "groups", 4, True, 3, True),
        (torch.float32, "groups", 8, False, 4, False),
        (torch.bfloat16, "tma", 4, True, 0, False),
        (torch.float32, "tma", 8, False, 0, False),
    ],
    ids=str,
)
def test_fused_qkv_gradient_matches_reference(
    dtype, bwd, bt, copy_v, hg, prefetch, device, assert_matches, monkeypatch
):
    """qkv_norm_rope_train over one fused q|k|v row: outputs and the one fused input gradient; the incoming
    q gradient in a transposed (B, H, T, D) layout (read in place). The row kernel with bt tokens of one head a
    program (18 tokens: a ragged last block; NSLOT 2: programs share weight-gradient slots), v's gradient
    copied in the same launch or apart; the head-group kernel with hg heads a program (3: q's second group
    and the k/v groups partly masked; 4: k's and v's half masked), the next head's loads first or not; the
    previous token-range kernel."""
    from llmray.kernels import qk_norm_rope_train as mod
    from llmray.kernels.qk_norm_rope_train import qkv_norm_rope_train

    monkeypatch.setattr(mod, "BWD", bwd)
    monkeypatch.setattr(mod, "COPY_V", copy_v)
    if bt:
        monkeypatch.setattr(mod, "ROWS_BT", bt)
        monkeypatch.setattr(mod, "GROUP_BT", bt)
        monkeypatch.setattr(mod, "TMA_BT", bt)
        monkeypatch.setattr(mod, "NSLOT", 2)
    if hg:
        monkeypatch.setattr(mod, "GROUP_HG", hg)
        monkeypatch.setattr(mod, "GROUP_PREFETCH", prefetch)

    g = torch.Generator().manual_seed(1)
    b, t, hq, hk, d = 2, 9, 4, 2, 16  # 18 tokens: 5 blocks of 4 on 4 programs (CPU)
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, generator=g).to(device, dtype).requires_grad_(True)
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(device).requires_grad_(True)
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(device).requires_grad_(True)
    positions = torch.arange(t, device=device).expand(b, t)
    ang = torch.outer(torch.arange(16.0), torch.rand(d // 2, generator=g))
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    dq = torch.randn(b, hq, t, d, generator=g).to(device, dtype).transpose(1, 2)  # (B, T, H, D) view
    dk, dv = (torch.randn(b, t, h, d, generator=g).to(device, dtype) for h in (hk, hk))
    qo, ko, v = qkv_norm_rope_train(qkv, qw, kw, 1e-6, positions, cos, sin, hq, hk)
    torch.autograd.backward((qo, ko, v), (dq, dk, dv))
    ref = [x.detach().float().requires_grad_(True) for x in (qkv, qw, kw)]
    q_r, k_r, v_r = ref[0].split([hq * d, hk * d, hk * d], dim=-1)
    qr, kr = rope_ref(
        rms_norm_ref(q_r.reshape(b, t, hq, d), ref[1], 1e-6),
        rms_norm_ref(k_r.reshape(b, t, hk, d), ref[2], 1e-6),
        positions,
        cos,
        sin,
    )
    torch.autograd.backward((qr, kr, v_r.reshape(b, t, hk, d)), (dq.float(), dk.float(), dv.float()))
    assert_matches(qo, qr, dtype, "q")
    assert_matches(ko, kr, dtype, "k")
    assert torch.equal(v, qkv.detach()[..., (hq + hk) * d :].view(b, t, hk, d))
    assert_matches(qkv.grad, ref[0].grad, dtype, "dqkv")
    for x, r, name in zip((qw, kw), ref[1:], ("dqw", "dkw"), strict=True):
        assert_matches(x.grad, r.grad, torch.float32 if dtype == torch.float32 else dtype, name, reduced=True)


def _qkv_grads(shape, layout, device, seed=2):
    """(dqkv, dqw, dkw) of qkv_norm_rope_train in bf16 with incoming gradients in a (B, T, H, D) or a
    (B, H, T, D) layout, and torch's fp32 reference of the same."""
    from llmray.kernels.qk_norm_rope_train import qkv_norm_rope_train

    b, t, hq, hk, d = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, generator=g).to(device, torch.bfloat16).requires_grad_(True)
    qw = (1 + 0.1 * torch.randn(d, generator=g)).to(device).requires_grad_(True)
    kw = (1 + 0.1 * torch.randn(d, generator=g)).to(device).requires_grad_(True)
    positions = torch.arange(t, device=device).expand(b, t)
    ang = torch.outer(torch.arange(float(t)), torch.rand(d // 2, generator=g))
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    if layout == "bhtd":
        gs = [
            torch.randn(b, h, t, d, generator=g).to(device, torch.bfloat16).transpose(1, 2)
            for h in (hq, hk, hk)
        ]
    else:
        gs = [torch.randn(b, t, h, d, generator=g).to(device, torch.bfloat16) for h in (hq, hk, hk)]
    torch.autograd.backward(qkv_norm_rope_train(qkv, qw, kw, 1e-6, positions, cos, sin, hq, hk), gs)
    ref = [x.detach().float().requires_grad_(True) for x in (qkv, qw, kw)]
    q_r, k_r, v_r = ref[0].split([hq * d, hk * d, hk * d], dim=-1)
    qr, kr = rope_ref(rms_norm_ref(q_r.reshape(b, t, hq, d), ref[1], 1e-6),
                      rms_norm_ref(k_r.reshape(b, t, hk, d), ref[2], 1e-6), positions, cos, sin)  # fmt: skip
    torch.autograd.backward((qr, kr, v_r.reshape(b, t, hk, d)), [x.float() for x in gs])
    return [x.grad for x in (qkv, qw, kw)], [r.grad for r in ref]


def _new_vs_rows(shape, layout, device, assert_matches, monkeypatch, configs):
    """The head-group and the tensor-descriptor kernels (each config: module attributes) write the row kernel's
    fused gradient bit for bit (the descriptor kernel on the GPU: within tolerance, its tiles come through
    shared memory in another register layout, so a row's sums may round differently); both weight gradients
    match the fp32 reference."""
    from llmray.kernels import qk_norm_rope_train as mod

    monkeypatch.setattr(mod, "BWD", "rows")
    (want, *_), _ = _qkv_grads(shape, layout, device)
    for cfg in configs:
        for k, v in cfg.items():
            monkeypatch.setattr(mod, k, v)
        got, ref = _qkv_grads(shape, layout, device)
        if cfg["BWD"] == "groups" or device == "cpu":
            assert torch.equal(got[0], want), f"{cfg}: dqkv differs from the row kernel's"
        assert_matches(got[0], ref[0], torch.bfloat16, "dqkv")
        for x, r, name in zip(got[1:], ref[1:], ("dqw", "dkw"), strict=True):
            assert_matches(x, r, torch.bfloat16, name, reduced=True)


def _groups(bt, hg, prefetch=True):
    return {"BWD": "groups", "GROUP_BT": bt, "GROUP_HG": hg, "GROUP_PREFETCH": prefetch}


def _tma(bt, stages, per_sm=2, hg=1, maxnreg=None):
    return {"BWD": "tma", "TMA_BT": bt, "TMA_STAGES": stages, "TMA_PER_SM": per_sm, "TMA_HG": hg,
            "TMA_MAXNREG": maxnreg}  # fmt: skip


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_new_kernels_match_the_row_kernel_bitwise(layout, device, assert_matches, monkeypatch):
    """Small shapes (CPU interpreter): 4 tokens x 4 heads a program over 6 q / 2 kv heads (q's second group
    and the k/v groups half masked), 7 tokens (a ragged last block); 4-token items of the descriptor kernel,
    one head or 4 heads an item (the same masking)."""
    configs = [_groups(4, 4), _tma(4, 2), _tma(4, 3, hg=4, maxnreg=128)]
    _new_vs_rows((1, 7, 6, 2, 16), layout, device, assert_matches, monkeypatch, configs)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_new_kernels_real_shapes_gpu(layout, assert_matches, monkeypatch):
    """qwen3-0.6b's heads (16 q / 8 kv x 128) on 2 x 1,000 tokens (a ragged last block), launch configs of
    the sweep."""
    configs = [_groups(32, 4), _groups(16, 8), _groups(32, 2, False), _groups(64, 4), _groups(32, 1),
               _tma(32, 3), _tma(16, 4, 3), _tma(64, 3, 1), _tma(16, 3, 4, 1, 128), _tma(16, 3, 3, 2, 168),
               _tma(16, 3, 2, 4)]  # fmt: skip
    _new_vs_rows((2, 1000, 16, 8, 128), layout, "cuda", assert_matches, monkeypatch, configs)
