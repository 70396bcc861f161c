"""Muon: one step equals a plain reference implementation and torch.optim.Muon; one state dict.

The DDP split (each rank orthogonalises its share) is checked in tests/train/test_fsdp.py's 2-rank spawn."""

from __future__ import annotations

import math

import pytest
import torch

from llmray.train.loop import build_optimizer, muon_param_groups
from llmray.train.muon import MuonWithAuxAdam, zeropower_via_newtonschulz5


def reference_newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """Keller Jordan's single-matrix version, written out."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    if g.size(0) > g.size(1):
        x = x.T
    return x


def reference_muon_step(w, g, buf, lr, wd, mu=0.95):
    buf = mu * buf + (1 - mu) * g
    u = g + mu * (buf - g)  # Nesterov: lerp(g, buf, mu)
    o = reference_newton_schulz(u).float()
    scale = math.sqrt(max(1.0, w.shape[0] / w.shape[1]))
    return w * (1 - lr * wd) - lr * scale * o, buf


@pytest.mark.parametrize("shape", [(32, 16), (16, 48), (24, 24)])
def test_newton_schulz_matches_reference_and_orthogonalises(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    ours = zeropower_via_newtonschulz5(g).float()
    ref = reference_newton_schulz(g).float()
    # same bf16 arithmetic, different op fusion (addmm vs separate ops): a few bf16 ulps
    torch.testing.assert_close(ours, ref, atol=3e-2, rtol=3e-2)
    # batched (bmm) path equals the single-matrix path
    batched = zeropower_via_newtonschulz5(torch.stack([g, 2 * g])).float()
    torch.testing.assert_close(batched[0], ours, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(batched[1], ours, atol=1e-2, rtol=1e-2)  # scale-invariant
    # singular values pushed into roughly [0.6, 1.25] (the quintic does not converge exactly to 1)
    s = torch.linalg.svdvals(ours)
    assert s.min() > 0.5 and s.max() < 1.3, s


def test_muon_steps_match_reference():
    torch.manual_seed(0)
    w0 = torch.randn(32, 16)
    w = torch.nn.Parameter(w0.clone())
    opt = MuonWithAuxAdam([dict(params=[w], use_muon=True, lr=0.05, weight_decay=0.1)])
    ref_w, buf = w0.clone(), torch.zeros_like(w0)
    for _ in range(3):
        g = torch.randn_like(w0)
        w.grad = g.clone()
        opt.step()
        ref_w, buf = reference_muon_step(ref_w, g, buf, lr=0.05, wd=0.1)
        # the update is lr * sqrt(2) * O with O from bf16 (8-bit mantissa, ~4e-3 relative per entry,
        # |O| up to ~2): ~4e-3 absolute allows a couple of bf16 ulps of O times the step size
        torch.testing.assert_close(w.detach(), ref_w, atol=4e-3, rtol=0)
        torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf)
        ref_w = w.detach().clone()  # follow our trajectory so bf16 differences do not compound


def test_muon_matches_torch_optim_muon():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    torch.manual_seed(0)
    shapes = [(32, 16), (16, 48), (32, 16)]
    ours_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = MuonWithAuxAdam([dict(params=ours_p, use_muon=True, lr=0.02, weight_decay=0.1)])
    theirs = torch.optim.Muon(theirs_p, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    for _ in range(4):
        for a, b in zip(ours_p, theirs_p, strict=True):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p, strict=True):
        # updates are lr * O with |O| ~ 1: bf16 rounding differences of a few 1e-3 * lr per step
        torch.testing.assert_close(a.detach(), b.detach(), atol=2e-3, rtol=0)
        torch.testing.assert_close(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"])


def test_aux_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(10))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = MuonWithAuxAdam([dict(params=[p1], use_muon=False, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)])
    theirs = torch.optim.AdamW([p2], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for _ in range(5):
        g = torch.randn(10)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), atol=1e-6, rtol=1e-6)


def test_param_split_and_single_state_dict(tiny_model):
    groups = muon_param_groups(tiny_model, muon_lr=0.02, adam_lr=1e-3)
    muon_ids = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in tiny_model.named_parameters() if id(p) in muon_ids}
    assert all(".layers." in n and n.endswith("_proj.weight") for n in names)
    assert len(names) == 7 * tiny_model.config.num_hidden_layers  # q k v o gate up down per layer
    opt = build_optimizer(tiny_model, "muon")
    tiny_model.train()
    ids = torch.randint(0, 512, (2, 9))
    tiny_model(ids[:, :-1], targets=ids[:, 1:]).backward()
    opt.step()
    sd = opt.state_dict()
    kinds = {k for s in sd["state"].values() for k in s}
    assert kinds == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}
    assert len(sd["state"]) == len({id(p) for p in tiny_model.parameters()})


@pytest.mark.gpu
def test_side_stream_step_equals_one_stream_on_gpu():
    """CUDA, the training configuration (symmetric Newton-Schulz, Gram iteration, |X|^2 partial sums from the
    momentum pass on the side stream): several steps with the side stream equal the same steps on one stream
    and stay finite. (The partial sums' zero fill once raced the side stream: NaN within a few steps.)"""
    torch.manual_seed(0)
    shapes = [(3072, 1024), (1024, 3072), (1024, 1024), (2048, 1024), (1024, 2048)] * 2
    init = [torch.randn(s, device="cuda") * 0.02 for s in shapes]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(4)]
    finals = []
    for overlap in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        opt = MuonWithAuxAdam([{"params": params, "use_muon": True, "lr": 0.02}], overlap=overlap)
        opt.ns_sym = True
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step(grad_scale=torch.tensor(0.5, device="cuda"))
        finals.append([p.detach().clone() for p in params])
    for a, b in zip(*finals, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
