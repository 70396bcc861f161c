"""The fused optimizer passes (Triton kernels in the interpreter, torch._fused_adamw_) equal the foreach path."""

from __future__ import annotations

import pytest
import torch

from llmray.train.muon import MuonWithAuxAdam, zeropower_via_newtonschulz5
from llmray.train.optim_kernels import adamw_, muon_apply_, muon_momentum_

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels: CUDA, or the interpreter on CPU


@pytest.mark.parametrize("nesterov,multi", [(True, True), (False, True), (True, False)])
def test_momentum_kernel_equals_torch(nesterov, multi, monkeypatch):
    """multi: one launch for the group (address tables); else one launch per matrix."""
    import llmray.train.optim_kernels as ok

    monkeypatch.setattr(ok, "MULTI", multi)
    torch.manual_seed(0)
    grads = [torch.randn(24, 40, device=DEV) for _ in range(3)]
    bufs = [torch.randn(24, 40, device=DEV) for _ in range(3)]
    bufs_ref = [b.clone() for b in bufs]
    out, ref = (torch.empty(3, 24, 40, dtype=torch.bfloat16, device=DEV) for _ in range(2))
    muon_momentum_(grads, bufs, out, 0.95, nesterov, fused=True)
    muon_momentum_(grads, bufs_ref, ref, 0.95, nesterov, fused=False)
    for b, r in zip(bufs, bufs_ref, strict=True):
        torch.testing.assert_close(b, r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.float(), ref.float(), atol=0, rtol=1e-2)  # at most one bf16 rounding step


@pytest.mark.parametrize("transpose", [False, True])
def test_momentum_kernel_transposed_slots_and_norm_parts(transpose):
    """A tall weight's update written transposed into a wide stack's slot, and the sum of squares of each
    written update in partial sums (one per block), as the torch passes compute them."""
    import llmray.train.optim_kernels as ok

    torch.manual_seed(0)
    shape = (136, 72)  # ragged tiles and blocks
    grads = [torch.randn(shape, device=DEV) for _ in range(2)]
    bufs = [torch.randn(shape, device=DEV) for _ in range(2)]
    bufs_ref = [b.clone() for b in bufs]
    slot = shape[::-1] if transpose else shape
    out, ref = (torch.empty(2, *slot, dtype=torch.bfloat16, device=DEV) for _ in range(2))
    parts, parts_ref = (torch.zeros(2, ok.norm_parts(*shape), device=DEV) for _ in range(2))
    scale = torch.tensor(0.5, device=DEV)
    muon_momentum_(grads, bufs, out, 0.95, True, True, scale, transpose=transpose, parts=parts)
    muon_momentum_(grads, bufs_ref, ref, 0.95, True, False, scale, transpose=transpose, parts=parts_ref)
    torch.testing.assert_close(out.float(), ref.float(), atol=0, rtol=1e-2)  # one bf16 rounding apart
    torch.testing.assert_close(bufs[1], bufs_ref[1], atol=1e-6, rtol=1e-6)
    written = 3 * 2 if transpose else -(-136 * 72 // ok.BLOCK)  # (64, 64) tiles / 4096-element blocks
    assert (parts[:, :written] > 0).all() and (parts[:, written:] == 0).all()  # a sum per block
    # the partial sums add up to |out[i]|^2 of what was stored
    torch.testing.assert_close(parts.sum(1), out.float().square().sum((1, 2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(parts.sum(1), parts_ref.sum(1), rtol=2e-2, atol=0)


@pytest.mark.parametrize("shape,multi", [((48, 16), True), ((16, 48), True), ((48, 16), False)])
def test_apply_kernel_reads_transposed_updates(shape, multi, monkeypatch):
    """The update of each weight and its bf16 shadow (one buffer over both weights' rows), written in the
    same pass; multi: one launch for the group."""
    import llmray.train.optim_kernels as ok
    from llmray.model.master_linear import SHADOW, attach_shadows

    monkeypatch.setattr(ok, "MULTI", multi)
    torch.manual_seed(0)
    stack = torch.randn(2, *shape, device=DEV).bfloat16()
    ortho = zeropower_via_newtonschulz5(stack)  # a tall shape comes back as a transposed view
    params = [torch.randn(shape, device=DEV) for _ in range(2)]
    ref = [p.clone() for p in params]
    attach_shadows([params], torch.bfloat16)
    muon_apply_(params, ortho, 0.99, 0.03, fused=True)
    muon_apply_(ref, ortho, 0.99, 0.03, fused=False)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-6)
        sh, version = getattr(p, SHADOW)
        assert version == p._version
        # the weight in bf16: one rounding (the interpreter truncates, the GPU rounds to nearest)
        torch.testing.assert_close(sh.float(), r, atol=0, rtol=2**-7)


def _twin_steps(
    shapes, group: dict, steps: int, setup
) -> tuple[list, list, MuonWithAuxAdam, MuonWithAuxAdam]:
    """Two optimizers over equal copies of random parameters, fed the same random gradients for ``steps``
    steps; ``setup(a_opt, b_opt)`` switches what differs between them."""
    torch.manual_seed(0)
    init = [torch.randn(s, device=DEV) for s in shapes]
    a, b = ([torch.nn.Parameter(t.clone()) for t in init] for _ in range(2))
    oa, ob = MuonWithAuxAdam([dict(params=a, **group)]), MuonWithAuxAdam([dict(params=b, **group)])
    setup(oa, ob)
    for _ in range(steps):
        for pa, pb in zip(a, b, strict=True):
            pa.grad = torch.randn_like(pa)  # on DEV
            pb.grad = pa.grad.clone()
        oa.step()
        ob.step()
    return a, b, oa, ob


def test_fused_adamw_equals_foreach():
    group = dict(use_muon=False, lr=1e-2, weight_decay=0.1)
    a, b, oa, ob = _twin_steps([(7, 5), (11,)], group, 3, lambda oa, ob: setattr(ob, "fused_adamw", False))
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa.detach(), pb.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(oa.state[pa]["exp_avg_sq"], ob.state[pb]["exp_avg_sq"])
    assert oa.state[a[0]]["step"] == 3  # a Python int, as checkpoints store it
    assert not adamw_([torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)], [torch.zeros(2)],
                      [torch.zeros(2)], 1, 1e-3, (0.9, 0.95), 1e-8, 0.0)  # fmt: skip


@pytest.mark.parametrize("with_scale", [False, True])
def test_triton_adamw_equals_torch_fused(with_scale):
    """Our one-launch AdamW over a group of tensors of different sizes (interpreter on CPU) against
    ``torch._fused_adamw_``: same weights and moments after three steps, clipping's scale folded in."""
    torch.manual_seed(0)
    shapes = [(7, 5), (11,), (3, 1000)]
    init = [torch.randn(s, device=DEV) for s in shapes]
    states = [[t.clone() for t in init] for _ in range(2)]
    moments = [[[torch.zeros(s, device=DEV) for s in shapes] for _ in range(2)] for _ in range(2)]
    scale = torch.tensor(0.7, device=DEV) if with_scale else None
    for step in (1, 2, 3):
        grads = [torch.randn(s, device=DEV) for s in shapes]
        for (p, (m, v)), tri in zip(zip(states, moments, strict=True), (True, False), strict=True):
            assert adamw_(p, grads, m, v, step, 1e-2, (0.9, 0.95), 1e-8, 0.1, scale, triton=tri)
    for a, b in zip(
        states[0] + moments[0][0] + moments[0][1], states[1] + moments[1][0] + moments[1][1], strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_muon_step_fused_equals_unfused():
    group = dict(use_muon=True, lr=0.02, weight_decay=0.1)
    # a: the Triton kernels, here in the interpreter; b: the torch passes
    a, b, _, _ = _twin_steps(
        [(32, 16), (32, 16), (16, 48)], group, 2, lambda oa, ob: setattr(oa, "fused_passes", True)
    )
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(
            pa.detach(), pb.detach(), atol=2e-3, rtol=0
        )  # bf16 NS inputs: an ulp apart


@pytest.mark.gpu
def test_cuda_fused_overlapped_step_equals_plain():
    """On CUDA: Triton passes + side stream + fused AdamW vs the foreach path on one stream, a small Qwen3."""
    from llmray.config import ModelConfig
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.train.loop import build_optimizer

    torch.manual_seed(0)
    mc = ModelConfig.preset("seed-7m")
    with torch.device("cuda"):
        m1 = Qwen3ForCausalLM(mc, kernels="torch").train()
    m2 = Qwen3ForCausalLM(mc, kernels="torch").cuda().train()
    m2.load_state_dict(m1.state_dict())
    o1, o2 = (
        build_optimizer(m1, "muon", lr=1e-3, muon_lr=0.02),
        build_optimizer(m2, "muon", lr=1e-3, muon_lr=0.02),
    )
    o2.overlap, o2.fused_adamw, o2.fused_passes = False, False, False

    ids = torch.randint(0, mc.vocab_size, (2, 65), device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            m1(ids[:, :-1], targets=ids[:, 1:]).backward()
        for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
            b.grad = a.grad.clone()  # both optimizers see the same gradients
        o1.step()
        o2.step()
        o1.zero_grad(set_to_none=True)
        o2.zero_grad(set_to_none=True)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0, msg=n)


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "torch"])
def test_clipping_folded_into_the_step_equals_clip_then_step(fused):
    """harness.train_step's folded clipping (norm, then step(grad_scale=...)) equals clip_grad_norm_ + step()
    for Muon (momentum kernel / torch passes) and the AdamW group (fused AdamW's grad_scale / foreach)."""
    torch.manual_seed(0)
    shapes = [(32, 16), (16, 32), (24,), (40, 8)]
    init = [torch.randn(s, device=DEV) for s in shapes]
    runs = []
    for fold in (False, True):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = MuonWithAuxAdam([dict(params=[p for p in ps if p.dim() == 2][:2], use_muon=True, lr=0.02),
                               dict(params=[ps[2], ps[3]], use_muon=False, lr=1e-2)])  # fmt: skip
        opt.fused_passes, opt.fused_adamw = fused, fused
        norms = []
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = 5 * torch.randn(p.shape, generator=g).to(DEV)  # norm ~30 > 1: clipping is active
            if fold:
                norm = torch.nn.utils.get_total_norm([p.grad for p in ps], 2.0, foreach=True)
                opt.step(grad_scale=(1.0 / (norm + 1e-6)).clamp(max=1.0))
            else:
                norm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
                opt.step()
            norms.append(float(norm))
        runs.append((ps, norms))
    (a, na), (b, nb) = runs
    assert na == nb and min(na) > 1.0
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa.detach(), pb.detach(), atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("sym", [False, True], ids=["bmm", "sym_kernels"])
def test_muon_wide_stacks_equal_the_shape_stacks(sym, monkeypatch):
    """NS_GROUP_WIDE (tall weights' updates transposed into the stack of their wide shape), with |X|^2 from
    the momentum pass (NS_NORM_PARTS) and the folded Gram iteration (NS_FOLD), equals stacks by exact shape
    with the earlier passes: 2 steps, tall and wide weights of two ratios (Gram and plain iterations)."""
    import llmray.train.muon as mu

    monkeypatch.setattr(mu, "NS_SYM_MIN_SIZE", 0)  # the symmetric kernels at test sizes (interpreter on CPU)
    shapes = [(48, 16), (16, 48), (48, 16), (32, 16), (16, 32), (16, 16)]
    flags = ("NS_GROUP_WIDE", "NS_NORM_PARTS", "NS_FOLD")

    torch.manual_seed(0)
    init = [torch.randn(s, device=DEV) for s in shapes]
    a, b = ([torch.nn.Parameter(t.clone()) for t in init] for _ in range(2))
    oa, ob = (MuonWithAuxAdam([dict(params=p, use_muon=True, lr=0.02, weight_decay=0.1)]) for p in (a, b))
    for o in (oa, ob):
        o.fused_passes, o.ns_sym = True, sym
    for _ in range(2):
        for pa, pb in zip(a, b, strict=True):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        for o, new in ((oa, True), (ob, False)):
            for f in flags:
                monkeypatch.setattr(mu, f, new)
            o.step()
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa.detach(), pb.detach(), atol=1e-3, rtol=0)  # bf16 NS outputs: an ulp
        torch.testing.assert_close(oa.state[pa]["momentum_buffer"], ob.state[pb]["momentum_buffer"])
