"""master_linear: bf16 autocast over fp32 weights with fp32 weight gradients out of the GEMM, as F.linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmray.model.master_linear import master_linear


def test_matches_autocast_linear_one_and_two_weights():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16).bfloat16().requires_grad_(True)
    ws = [torch.randn(12, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)]
    dy = torch.randn(3, 7, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = master_linear(x, ws)
    y.backward(dy.bfloat16())
    xr = x.detach().clone().requires_grad_(True)
    wr = [w.detach().clone().requires_grad_(True) for w in ws]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr = F.linear(xr, torch.cat(wr))
    yr.backward(dy.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, yr)  # the same bf16 GEMM
    torch.testing.assert_close(x.grad, xr.grad)
    for w, r in zip(ws, wr, strict=True):
        assert w.grad.dtype == torch.float32 and w.grad.shape == w.shape
        # fp32 out of the GEMM vs the reference's bf16-rounded gradient: within one bf16 rounding
        torch.testing.assert_close(w.grad, r.grad, rtol=2**-7, atol=1e-2 * r.grad.abs().max().item())
    # outside autocast: a plain linear over the concatenated weights
    x32 = torch.randn(4, 16)
    torch.testing.assert_close(master_linear(x32, ws), F.linear(x32, torch.cat(ws)))


def test_shadows_replace_the_cast_until_the_weight_changes():
    """attach_shadows: the forward reads the bf16 buffer over [w1; w2] (no cast, no cat) while it is current;
    Muon's fused update pass writes weight and shadow together (interpreter on CPU); an in-place change by
    anything else moves the weight's version and the forward casts again."""
    from llmray.model.master_linear import attach_shadows, detach_shadows
    from llmray.train.optim_kernels import muon_apply_

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ws = [
        torch.randn(12, 16, device=dev, requires_grad=True),
        torch.randn(4, 16, device=dev, requires_grad=True),
    ]
    attach_shadows([ws], torch.bfloat16)
    x = torch.randn(5, 16, device=dev)
    with torch.no_grad():
        buf = ws[0]._llmray_shadow[0].as_strided((16, 16), (16, 1))
        buf.add_(1.0)  # mark the buffer: a read of it is visible in the output
    with torch.autocast(dev, dtype=torch.bfloat16):
        y = master_linear(x, ws)
    assert torch.equal(y, F.linear(x.bfloat16(), buf))  # the shadow, not a fresh cast
    with torch.no_grad():  # the fused update pass keeps the shadow current
        ortho = torch.randn(1, 4, 16, device=dev).bfloat16()
        muon_apply_([ws[1]], ortho, 0.9, 0.1, fused=True)
    shadow = ws[1]._llmray_shadow[0].float()  # written in the same pass (the interpreter rounds toward 0)
    torch.testing.assert_close(shadow, ws[1].detach(), rtol=2**-7, atol=0)
    with torch.autocast(dev, dtype=torch.bfloat16):
        y = master_linear(x, ws)
    assert torch.equal(y, F.linear(x.bfloat16(), buf))  # still current: read, not cast
    with torch.no_grad():
        ws[0].mul_(2.0)  # not through the update pass: the shadow is stale, so the forward casts
    with torch.autocast(dev, dtype=torch.bfloat16):
        y = master_linear(x, ws)
    assert torch.equal(y, F.linear(x.bfloat16(), torch.cat(ws).detach().bfloat16()))
    detach_shadows(ws)
    assert not hasattr(ws[0], "_llmray_shadow")
