"""FSDP2 (``fully_shard``) pretraining on 2 CPU processes (gloo) against DDP on the same rows.

One ``torch.multiprocessing`` spawn (no Ray: its start-up would dominate) runs in each of 2 ranks:
(1) ``train_steps`` with DDP, (2) with ``parallel="fsdp"`` (Muon gathering each sharded matrix),
(3) FSDP2 resumed from its own step-3 checkpoint; plus the row gather/scatter helpers on a matrix whose
7 rows do not split evenly, and Muon's DDP split (each rank orthogonalises its share of the matrices)
against one process. Each rank takes its half of the same global batch, so (1) and (2) do the same
arithmetic up to the order of the gradient reductions. Rank 0 writes what it saw to JSON; the test
asserts on it and on the checkpoint files. The production path (``--parallel fsdp`` on 2 Ray Train workers,
killed and resumed, exported) is tests/train/test_pretrain.py's fault test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmray.config import ModelConfig
from llmray.train import data as D
from llmray.train.loop import MODEL_FILE, OPTIM_FILE, load_checkpoint, read_metrics
from llmray.train.pretrain import PretrainConfig, train_steps
from llmray.train.session import LocalSession

STEPS, WORLD, BATCH, SEQ = 6, 2, 4, 32  # BATCH sequences per rank per step


def _tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A learnable stream: each token follows its predecessor by one of 3 random successors."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, size=(vocab, 3))
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    picks = rng.integers(0, 3, size=n)
    for i in range(1, n):
        out[i] = succ[out[i - 1], picks[i]]
    return out


def _rank_batches(tokens: np.ndarray, seed: int, rank: int):
    """This rank's half of each global micro-batch (rows [rank B, (rank + 1) B) of WORLD * B).

    The runs accumulate 2 micro-batches per step (DDP ``no_sync`` / FSDP2 ``set_requires_gradient_sync``).
    """
    full = D.local_batches(tokens, SEQ, seed, WORLD * BATCH)
    for batch in full:
        yield batch[rank * BATCH : (rank + 1) * BATCH]


def _run(cfg: PretrainConfig, mc: ModelConfig, train, val, rank: int, resume: str | None, keep: Path):
    """One rank's loop; rank 0 keeps every checkpoint as ``keep/checkpoint_<step>``."""
    session = LocalSession(root=keep, keep=100, rank=rank, world=WORLD, resume=resume)
    batches = _rank_batches(train, cfg.seed, rank)  # a resumed loop skips the batches consumed before
    train_steps(cfg, mc, batches, val, session)


def _helpers_check(rank: int) -> dict:
    """gather_rows / local_rows on 7 rows over 2 ranks (FSDP2 pads: 4 + 3)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from llmray.train.fsdp import gather_rows, local_rows, orthogonalize_rows
    from llmray.train.muon import zeropower_via_newtonschulz5 as ns

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(1)
    full = torch.randn(3, 7, 5)
    dts = [distribute_tensor(m, mesh, [Shard(0)]) for m in full]
    gathered = gather_rows(dts)
    back = [local_rows(m, d).to_local() for m, d in zip(full, dts, strict=True)]
    even = torch.randn(3, 6, 5)  # 3 matrices over 2 ranks: the all-to-all pads to 4
    even_dts = [distribute_tensor(m, mesh, [Shard(0)]) for m in even]

    def ortho_ok(mats: torch.Tensor, dts: list) -> bool:
        want = ns(mats).float()  # whole matrices, then this rank's rows
        got = orthogonalize_rows(dts, lambda x: ns(x).float())
        return all(
            torch.equal(g.to_local(), local_rows(w, d).to_local())
            for g, w, d in zip(got, want, dts, strict=True)
        )

    return {
        "uneven_gather_ok": bool(torch.equal(gathered, full)),
        "uneven_local_ok": all(torch.equal(b, d.to_local()) for b, d in zip(back, dts, strict=True)),
        "local_rows": [b.shape[0] for b in back],
        "even_gather_ok": bool(torch.equal(gather_rows(even_dts), even)),
        "even_orthogonalize_ok": ortho_ok(even, even_dts),
        "uneven_orthogonalize_ok": ortho_ok(full, dts),
    }


MUON_SHAPES = [(16, 8), (16, 8), (16, 8), (8, 24)]  # 3 of one shape: ranks own 2 and 1 (padding)


def _muon_steps(world_rank: int | None) -> list[torch.Tensor]:
    """Two Muon steps on MUON_SHAPES with fixed gradients: in one process (None) or as a DDP rank, where
    each rank orthogonalises its share of a shape group and the new weights are all-gathered."""
    from llmray.train.muon import MuonWithAuxAdam

    torch.manual_seed(1)
    grads = [[torch.randn(s) for s in MUON_SHAPES] for _ in range(2)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in MUON_SHAPES]
    opt = MuonWithAuxAdam([dict(params=params, use_muon=True, lr=0.02, weight_decay=0.05)])
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _worker(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    root_p = Path(root)
    mc = ModelConfig.preset("tiny")
    tokens = _tokens(20_000, mc.vocab_size)
    train, val = tokens[:18_000], tokens[18_000:]
    base = PretrainConfig(data="-", out=str(root_p / "ddp"), preset="tiny", max_steps=STEPS, seq_len=SEQ,
                          batch_size=BATCH, grad_accum=2, num_workers=WORLD, checkpoint_every=3, eval_every=3,
                          eval_windows=7, warmup_steps=1, kernels="torch", lr=3e-3, muon_lr=0.02)  # fmt: skip
    for name, cfg, resume in [
        ("ddp", base, None),
        ("fsdp", dataclasses.replace(base, out=str(root_p / "fsdp"), parallel="fsdp"), None),
        ("fsdp_resumed", dataclasses.replace(base, out=str(root_p / "fsdp_resumed"), parallel="fsdp"),
         str(root_p / "ckpt_fsdp" / "checkpoint_00000003")),
    ]:  # fmt: skip
        keep = root_p / f"ckpt_{name}"
        keep.mkdir(exist_ok=True)
        _run(cfg, mc, train, val, rank, resume, keep)
        dist.barrier()
    helpers = _helpers_check(rank)
    muon = _muon_steps(rank)
    if rank == 0:
        (root_p / "helpers.json").write_text(json.dumps(helpers))
    if rank == 1:  # rank 1 owns the padded, shorter share
        save_file(
            {str(i): p.contiguous() for i, p in enumerate(muon)}, str(root_p / "muon_rank1.safetensors")
        )
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


def _losses(root: Path, name: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(root / name / "metrics.jsonl")}


def test_fsdp_loss_curve_equals_ddp(runs):
    ddp, fsdp = _losses(runs, "ddp"), _losses(runs, "fsdp")
    assert sorted(ddp) == sorted(fsdp) == list(range(1, STEPS + 1))
    a = [ddp[s]["loss"] for s in sorted(ddp)]
    b = [fsdp[s]["loss"] for s in sorted(fsdp)]
    # same rows and arithmetic up to all-reduce vs reduce-scatter summation order (and the bf16
    # Newton-Schulz rounding that order can flip); a wrong shard or a missed update differs by > 1e-2
    np.testing.assert_allclose(b, a, atol=2e-3, rtol=0)
    assert a[-1] < a[0] - 0.05  # it learned
    for step in (3, 6):  # validation ran in lockstep on both ranks and agrees
        assert fsdp[step]["val_loss"] == pytest.approx(ddp[step]["val_loss"], abs=2e-3)
    assert fsdp[6]["grad_norm"] == pytest.approx(ddp[6]["grad_norm"], rel=2e-2)


def test_fsdp_checkpoint_is_the_plain_format_and_loads(runs):
    from llmray.model.qwen3 import Qwen3ForCausalLM

    d, f = runs / "ckpt_ddp" / "checkpoint_00000006", runs / "ckpt_fsdp" / "checkpoint_00000006"
    wd, wf = load_file(str(d / MODEL_FILE)), load_file(str(f / MODEL_FILE))
    assert sorted(wd) == sorted(wf) and "lm_head.weight" not in wf  # tied head stored once, as DDP
    for k in wd:
        assert wf[k].shape == wd[k].shape
        torch.testing.assert_close(wf[k], wd[k], atol=5e-3, rtol=0)
    od, of = load_file(str(d / OPTIM_FILE)), load_file(str(f / OPTIM_FILE))
    assert {k: v.shape for k, v in od.items()} == {k: v.shape for k, v in of.items()}
    # the existing resume path loads it into a plain single-device model
    model = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch")
    state = load_checkpoint(f, model)
    assert state["step"] == STEPS
    torch.testing.assert_close(model.lm_head.weight, wf["model.embed_tokens.weight"])


def test_fsdp_resume_continues_the_curve(runs):
    fsdp, resumed = _losses(runs, "fsdp"), _losses(runs, "fsdp_resumed")
    assert sorted(resumed) == [4, 5, 6]
    np.testing.assert_allclose(
        [resumed[s]["loss"] for s in (4, 5, 6)], [fsdp[s]["loss"] for s in (4, 5, 6)], atol=1e-4, rtol=0
    )


def test_row_helpers_even_and_uneven_shards(runs):
    h = json.loads((runs / "helpers.json").read_text())
    assert h == {"uneven_gather_ok": True, "uneven_local_ok": True, "local_rows": [4, 4, 4],
                 "even_gather_ok": True, "even_orthogonalize_ok": True,
                 "uneven_orthogonalize_ok": True}  # fmt: skip


def test_muon_ddp_split_equals_single_device(runs):
    """Muon under DDP (each rank orthogonalises its share, weights all-gathered) = one process, 2 steps."""
    loaded = load_file(str(runs / "muon_rank1.safetensors"))
    single = _muon_steps(None)
    for i, want in enumerate(single):
        torch.testing.assert_close(loaded[str(i)], want, atol=1e-6, rtol=0)
