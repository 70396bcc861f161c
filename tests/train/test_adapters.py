"""llmray's LoRA training layers against peft: the same logits, losses and gradients, and adapters that
round-trip both ways (peft loads what we write, we load what peft writes), LoRA and QLoRA (NF4)."""

from __future__ import annotations

import copy

import pytest
import torch

from llmray.config import LoraConfig, ModelConfig
from llmray.model.qwen3 import Qwen3ForCausalLM
from llmray.train import adapters, peft_adapters

peft = pytest.importorskip("peft")


def _base() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch").train()


def _randomize_b(model) -> None:
    """LoRA B starts at zero; give it values so the adapter changes the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _pair(cfg: LoraConfig):
    """(ours, peft's) on copies of one base, with equal adapter weights."""
    ours = adapters.apply_lora(_base(), cfg)
    _randomize_b(ours)
    pm = peft_adapters.apply_lora(_base(), cfg, gradient_checkpointing=False)
    peft_adapters.load_adapter_state(pm, adapters.adapter_state(ours))
    return ours, pm


def _batch(vocab: int):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    return ids, torch.roll(ids, -1, 1)


@pytest.mark.parametrize("targets", ["attn", "all-linear"])
def test_loss_and_gradients_match_peft(targets):
    cfg = LoraConfig(r=4, alpha=8, targets=targets)
    ours, pm = _pair(cfg)
    ids, tgt = _batch(ours.config.vocab_size)
    loss_o, loss_p = ours(ids, targets=tgt), pm(ids, targets=tgt)
    loss_o.backward()
    loss_p.backward()
    torch.testing.assert_close(loss_o, loss_p, rtol=1e-5, atol=1e-6)
    grads_p = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in pm.named_parameters()
               if p.requires_grad}  # fmt: skip
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(grads_o) == sorted(k.replace(".weight", "") for k in grads_p)
    for n, g in grads_o.items():
        torch.testing.assert_close(g, grads_p[n + ".weight"], rtol=1e-4, atol=1e-6)
    # frozen base: no gradient buffers at all
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)
    # a few AdamW steps: the loss curves agree
    curves = []
    for model in (ours, pm):
        model.zero_grad()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(4):
            loss = model(ids, targets=tgt)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0]
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-5)


def test_adapters_round_trip_with_peft(tmp_path):
    cfg = LoraConfig(r=4, alpha=8, targets="all-linear")
    ours, pm = _pair(cfg)
    ids, _ = _batch(ours.config.vocab_size)
    ours.eval()
    with torch.no_grad():
        want = ours(ids)
    # peft loads what we write, with our logits
    adapters.save_adapter(ours, tmp_path / "ours", None)
    conf = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert conf.task_type == "CAUSAL_LM" and conf.r == 4 and conf.lora_alpha == 8
    conf.task_type = None  # the plain PeftModel wrapper around llmray's model (transformers takes CAUSAL_LM)
    loaded = peft.PeftModel.from_pretrained(_base().eval(), str(tmp_path / "ours"), config=conf).eval()
    # we load what peft writes, with peft's logits
    peft_adapters.save_adapter(pm, tmp_path / "peft", None)
    mine = _base().eval()
    adapters.apply_peft_adapter(mine, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine(ids), pm.eval()(ids), rtol=1e-5, atol=1e-5)


def test_qlora_nf4_base_matches_peft():
    pytest.importorskip("bitsandbytes")
    cfg = LoraConfig(r=4, alpha=8, targets="all-linear", qlora=True)
    base = _base()
    ours = adapters.apply_lora(peft_adapters.quantize_nf4(copy.deepcopy(base), "cpu", torch.float32), cfg)
    _randomize_b(ours)
    pm = peft_adapters.apply_lora(copy.deepcopy(base), cfg, gradient_checkpointing=False)
    peft_adapters.load_adapter_state(pm, adapters.adapter_state(ours))
    ids, tgt = _batch(base.config.vocab_size)
    loss_o, loss_p = ours(ids, targets=tgt), pm(ids, targets=tgt)
    loss_o.backward()
    loss_p.backward()
    torch.testing.assert_close(loss_o, loss_p, rtol=1e-4, atol=1e-5)
    q = ours.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.dtype == torch.uint8 and q.lora_A.grad is not None
    ref = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
    torch.testing.assert_close(q.lora_A.grad, ref, rtol=1e-3, atol=1e-5)


def test_rejects_unknown_targets():
    with pytest.raises(ValueError, match="name no linear layer"):
        adapters.apply_lora(_base(), LoraConfig(targets="qq_proj"))


def test_siblings_share_one_shrink_and_fall_back_when_inputs_differ():
    """q/k/v (and gate/up) reading one input run as one autograd node; layers called with different
    inputs still give each layer's own output (the group switches itself off)."""
    ours = adapters.apply_lora(_base(), LoraConfig(r=4, alpha=8, targets="all-linear"))
    _randomize_b(ours)
    attn = ours.model.layers[0].self_attn
    assert attn.q_proj.group is attn.k_proj.group is attn.v_proj.group is not None
    assert ours.model.layers[0].mlp.gate_proj.group is not None and attn.o_proj.group is None
    x = torch.randn(2, 5, ours.config.hidden_size, requires_grad=True)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    nodes = {t.grad_fn.next_functions[0][0] for t in (q, k, v)}  # under each output's view
    assert len(nodes) == 1 and "LoraGroupFn" in type(nodes.pop()).__name__  # one node for the three
    alone = [adapters._run([m], x)[0] for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    for got, want in zip((q, k, v), alone, strict=True):
        torch.testing.assert_close(got, want)
    (q.sum() + 2 * k.sum() + 3 * v.sum()).backward()
    gx = x.grad.clone()
    x.grad = None
    (alone[0].sum() + 2 * alone[1].sum() + 3 * alone[2].sum()).backward()
    torch.testing.assert_close(gx, x.grad)
    y = torch.randn_like(x)
    q2, k2 = attn.q_proj(x), attn.k_proj(y)  # v never taken, k reads another tensor
    torch.testing.assert_close(k2, adapters._run([attn.k_proj], y)[0])
    torch.testing.assert_close(q2, adapters._run([attn.q_proj], x)[0])
    assert not attn.q_proj.group.shared


def test_bf16_autocast_step_matches_peft():
    """The GPU's mixed precision on the CPU: bf16 autocast over a bf16 base, fp32 adapters."""
    cfg = LoraConfig(r=4, alpha=8, targets="all-linear")
    ours, pm = _pair(cfg)
    ours, pm = ours.to(torch.bfloat16), pm.to(torch.bfloat16)
    for m in (ours, pm):
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    ids, tgt = _batch(ours.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_o, loss_p = ours(ids, targets=tgt), pm(ids, targets=tgt)
    loss_o.backward()
    loss_p.backward()
    torch.testing.assert_close(loss_o.float(), loss_p.float(), rtol=1e-2, atol=1e-2)
    q = ours.model.layers[1].self_attn.q_proj
    ref = pm.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight.grad
    assert q.lora_A.grad.dtype == torch.float32
    torch.testing.assert_close(q.lora_A.grad, ref.float(), rtol=5e-2, atol=5e-3)
