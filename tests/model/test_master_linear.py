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
