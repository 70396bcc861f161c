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


@pytest.mark.parametrize(
    "flags",
    [dict(SYM_TMA=0), dict(SYM_TMA=1, SYM_TMA_OUT=1), dict(SYM_PERSIST=1)],
    ids=["pointers", "tma_out", "persist"],
)
def test_sym_gram_launch_variants_match_torch(flags, monkeypatch, device):
    """Pointer loads, TMA descriptor loads (the default) and stores, and the persistent loop give torch's
    products (fp32: equal up to summation order)."""
    import llmray.kernels.newton_schulz as ns

    for k, v in flags.items():
        monkeypatch.setattr(ns, k, v)
    torch.manual_seed(0)
    for r, k in ((40, 48), (64, 64)):  # a ragged last tile; even tiles
        x = torch.randn(2, r, k, device=device)
        a = sym_gram(x, config=CFG)
        torch.testing.assert_close(a, x @ x.mT, atol=1e-4, rtol=1e-5)
        poly = sym_gram(a, alpha=0.5, s=a, beta=-1.5, diag=2.0, config=CFG)
        torch.testing.assert_close(
            poly, 0.5 * a @ a.mT - 1.5 * a + 2 * torch.eye(r, device=device), atol=2e-3, rtol=1e-5
        )
        xt = torch.randn(2, k, r, device=device).mT  # a transposed view: pointer loads
        torch.testing.assert_close(sym_gram(xt, config=CFG), xt @ xt.mT, atol=1e-4, rtol=1e-5)


def test_sym_gram_norm_modes_sum_partials(device):
    """norm_sq given as (n, p) partial sums: "gram" = X X^T / |X|^2, "rsqrt" = X Y^T / |X|."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 24, device=device)
    parts = torch.rand(2, 5, device=device) + 0.5
    tot = parts.sum(1).view(2, 1, 1)
    g = sym_gram(x, config=CFG, norm_sq=parts, nsq_mode="gram")
    torch.testing.assert_close(g, x @ x.mT / tot, atol=1e-5, rtol=1e-5)
    s = x @ x.mT
    t = 0.3 * s + s @ s
    q = sym_gram(s, y=t, config=CFG, norm_sq=parts, nsq_mode="rsqrt")
    torch.testing.assert_close(q, s @ t / tot.sqrt(), atol=1e-2, rtol=1e-4)
    with pytest.raises(ValueError, match="nsq_mode"):
        sym_gram(x, norm_sq=parts, nsq_mode="other")


def test_gram_fold_equals_the_unfolded_iteration(device):
    """The Gram iteration with its normalization and casts in the products' epilogues (and |X|^2 given as
    partial sums, as the momentum pass writes them) against the one with torch passes: bf16 rounding apart."""
    torch.manual_seed(0)
    coef = (3.4445, -4.7750, 2.0315)
    x = (torch.randn(2, 32, 96, device=device) * 1e-3).bfloat16()
    old = newton_schulz_gram(x, 5, coef, fold=False).float()
    new = newton_schulz_gram(x, 5, coef).float()
    parts = x.float().square().reshape(2, 4, -1).sum(-1)  # (2, 4) partial sums of |X|^2
    given = newton_schulz_gram(x, 5, coef, norm_sq=parts).float()
    for o in (new, given):
        assert (o - old).norm() / old.norm() < 1e-2  # fp16 Q kept in fp32 before its bf16 cast: ~4e-3
    torch.testing.assert_close(new, given, atol=4e-3, rtol=0)  # |X|^2 summed in another order: an ulp
