"""Newton-Schulz's symmetric products (llmray.kernels.newton_schulz.sym_gram) against torch, and Muon's
Newton-Schulz with them against the fp32 reference iteration (CPU: the Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

from llmray.kernels.newton_schulz import newton_schulz_gram, newton_schulz_sym, sym_gram, sym_gram_ref
from llmray.train.muon import zeropower_via_newtonschulz5

CFG = (16, 16, 4, 1)  # 16-row tiles: several tiles (mirrored ones too) at test sizes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sym_gram_matches_torch(dtype, device, assert_matches):
    torch.manual_seed(0)
    x = torch.randn(1, 40, 48, device=device).to(dtype)  # 40 rows: a ragged last tile
    for xin in (x, x[:, :, :40].mT):  # contiguous and a transposed view (a tall stack's first step)
        ref = sym_gram_ref(xin.float())
        assert_matches(sym_gram(xin, config=CFG), ref, dtype, "x x^T")
    a = sym_gram(x, config=CFG)
    poly = sym_gram(a, alpha=2.0315, s=a, beta=-4.775, diag=3.4445, config=CFG)  # c A A^T + b A + a I
    ref = sym_gram_ref(a.float(), 2.0315, a.float(), -4.775, 3.4445)
    assert_matches(poly, ref, dtype, "c A^2 + b A + a I")
    assert_matches(poly, poly.mT.float(), dtype, "symmetric")  # mirrored tiles are copies
    if dtype == torch.float32:  # x y^T of two commuting symmetric matrices (Gram Newton-Schulz's products)
        s = (x[0] @ x[0].mT).unsqueeze(0)
        t = 0.5 * s + s @ s
        assert_matches(sym_gram(s, y=t, config=CFG), s @ t, dtype, "S T")


def reference_ns_fp32(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    for _ in range(steps):
        m = x @ x.mT
        x = a * x + (b * m + c * m @ m) @ x
    return x.mT if tall else x


@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 48, 32), (2, 48, 16)])  # wide, tall; 3x tall: Gram
def test_newton_schulz_symmetric_kernel_matches_reference(shape, device):
    torch.manual_seed(0)
    g = torch.randn(shape, device=device)
    ref = reference_ns_fp32(g)
    plain = zeropower_via_newtonschulz5(g).float()
    sym = zeropower_via_newtonschulz5(g, sym=True).float()
    assert sym.shape == g.shape and sym.dtype == torch.float32
    err_sym = (sym - ref).abs().max().item()
    err_plain = (plain - ref).abs().max().item()
    assert err_sym < 3e-2 and err_sym < 2 * err_plain + 1e-2, (err_sym, err_plain)  # bf16 noise, not worse


def test_gram_newton_schulz_is_closer_to_fp32_than_the_bf16_iteration(device):
    """Gram Newton-Schulz (fp16 Gram matrix, a restart after iteration 2) against the same iteration in fp32:
    its error is below the bf16 iteration's (the one Muon ran before it), on two wide stacks."""
    torch.manual_seed(0)
    coef = (3.4445, -4.7750, 2.0315)
    for shape in [(2, 32, 96), (1, 40, 88)]:
        x = torch.randn(shape, device=device) * 1e-3  # raw momentum scale: normalized inside
        ref = reference_ns_fp32(x).double()
        gram = newton_schulz_gram(x.bfloat16(), 5, coef)
        plain = newton_schulz_sym(x.bfloat16(), 5, coef)
        assert gram.shape == x.shape and gram.dtype == torch.bfloat16
        e_gram, e_plain = (((o.double() - ref).norm() / ref.norm()).item() for o in (gram, plain))
        assert e_gram < e_plain and e_gram < 0.02, (
            shape,
            e_gram,
            e_plain,
        )  # CPU 0.011 vs 0.03, H200 0.012 vs 0.015
