"""Data parallelism for training: DDP or FSDP2 (``torch.distributed.fsdp.fully_shard``), and their state.

``parallelize`` turns a single-device model into what a worker trains:

- ``ddp``: ``DistributedDataParallel`` (every rank holds all weights and optimizer state; gradients are
  all-reduced). Muon then shares its Newton-Schulz work between ranks (see ``llmray.train.muon``).
- ``fsdp``: FSDP2, as torchtitan applies it: ``fully_shard`` on every decoder block, then on the root (the
  embedding, the tied head and the final norm form the root's group). Parameters become DTensors sharded on
  dim 0, so each rank keeps 1/world of the weights, gradients and optimizer state; a block's weights are
  all-gathered just before its forward/backward and gradients are reduce-scattered. Ray Train's
  ``prepare_model(parallel_strategy="fsdp")`` would give FSDP1, hence ``fully_shard`` here.

Muon orthogonalises whole matrices, so under FSDP2 ``orthogonalize_rows`` brings each sharded update
matrix whole to one rank (an all-to-all per shape group), which runs Newton-Schulz on it, and a second
all-to-all hands every rank its rows of the result (the Newton-Schulz work is split between ranks).

Checkpoints stay the plain single-device format (``llmray.train.loop.save_checkpoint``): every rank joins
``full_model_tensors`` / ``full_optimizer_state`` (gathers; CPU copies on rank 0 only), rank 0 writes them;
on resume the weights load into the unsharded model before ``fully_shard`` and ``shard_optimizer_state``
cuts the saved optimizer tensors to each rank's rows.

Compilation: ``compile="blocks"`` compiles each decoder block in place (one graph reused by all blocks:
short compile times, and it composes with FSDP2's per-block hooks); ``"model"`` compiles the whole
(DDP-wrapped) model as the single-GPU benchmark does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

PARALLEL_MODES = ("ddp", "fsdp")
COMPILE_MODES = ("none", "blocks", "model")


def _dtensor_cls() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    return isinstance(t, _dtensor_cls())


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a llmray Qwen3 model (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: FSDP2 wraps Qwen3ForCausalLM blocks")
    return list(layers)


def shard_model(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` each decoder block, then the root. Needs torch.distributed initialised.

    ``param_dtype`` (e.g. bf16) all-gathers and computes in that dtype with fp32 gradient reduction; the
    default (None) keeps fp32 parameters, so bf16 autocast gives the same numbers as DDP.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "FSDP2 needs torch.distributed initialised (a Ray Train worker or init_process_group)"
        )
    kwargs: dict[str, Any] = {}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # the last block's weights are needed again at once by backward: keep them gathered
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` every decoder block in place (parameter names unchanged)."""
    for block in decoder_blocks(model):
        block.compile()


def parallelize(
    model: nn.Module,
    parallel: str,
    world: int,
    device: torch.device,
    compile: str = "none",
    fsdp_param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Wrap a model (on ``device``, weights final) for data-parallel training; returns the module to call.

    Build the optimizer after this: FSDP2 replaces the parameters by DTensors. ``fsdp_param_dtype``: see
    ``shard_model``.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    if compile == "blocks":
        compile_blocks(model)
    fwd: nn.Module = model
    if world > 1 and parallel == "fsdp":
        if compile == "model":
            raise ValueError("compile='model' is for DDP; FSDP2 compiles per block (compile='blocks')")
        shard_model(model, param_dtype=fsdp_param_dtype)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # buffers are constant rope tables: no per-forward broadcast; gradients live in the buckets
        fwd = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )
    if compile == "model":
        compiled = torch.compile(fwd)
        assert isinstance(compiled, nn.Module), "torch.compile wraps a module in an OptimizedModule"
        fwd = compiled
    return fwd


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's counterpart of DDP's ``no_sync``: skip the reduce-scatter on accumulation micro-steps."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        raise TypeError(f"set_gradient_sync needs a fully_shard model (FSDP2), got {type(model).__name__}")
    model.set_requires_gradient_sync(sync)


def to_float(x: torch.Tensor | float) -> float:
    """A scalar (a DTensor one from ``clip_grad_norm_`` under FSDP2 included) as a Python float."""
    if is_dtensor(x):
        x = x.full_tensor()
    return float(x)


# --- sharded matrices for Muon ------------------------------------------------------------------------
def _row_sharded(t: torch.Tensor) -> DTensor:
    """``t`` as a DTensor sharded on dim 0 over a 1-D mesh (ValueError for anything else)."""
    from torch.distributed.tensor import Shard

    if not is_dtensor(t) or tuple(t.placements) != (Shard(0),):
        got = t.placements if is_dtensor(t) else f"a plain {type(t).__name__}"
        raise ValueError(f"Muon under FSDP2 expects parameters sharded on dim 0 over a 1-D mesh, got {got}")
    return t


def gather_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Full matrices (n, rows, cols) from n DTensors of one shape sharded on rows (a collective)."""
    dts = [_row_sharded(t) for t in tensors]
    mesh = dts[0].device_mesh
    world = mesh.size()
    rows, cols = dts[0].shape
    if rows % world:  # uneven shards (padded by FSDP2): gather matrix by matrix
        return torch.stack([t.full_tensor() for t in dts])
    local = torch.stack([t.to_local() for t in dts])  # (n, rows/world, cols)
    out = local.new_empty((world * len(tensors), *local.shape[1:]))  # (world * n, rows/world, cols)
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns there); 2.11 has only the latter
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.contiguous(), group=mesh.get_group())
    out = out.view(world, len(tensors), rows // world, cols)  # rank r holds rows [r R/w, (r+1) R/w)
    return out.transpose(0, 1).reshape(len(tensors), rows, cols)


def orthogonalize_rows(
    tensors: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """``fn`` (n, rows, cols) -> (n, rows, cols) applied to whole matrices; returns this rank's rows of each.

    ``tensors``: n DTensors of one shape sharded on rows. With rows divisible by the world size the work
    is split: an all-to-all brings each matrix whole to one owner rank (matrix i to rank i // m, m =
    ceil(n / world)), the owner runs ``fn`` on its m matrices, and a second all-to-all returns each rank
    its rows: every rank moves 2 (w - 1) / w^2 of the group instead of the (w - 1) / w an all-gather
    would, and computes 1/w of it. Otherwise (padded shards) every rank gathers and computes everything.
    """
    from torch.distributed.tensor import DTensor

    dts = [_row_sharded(t) for t in tensors]
    mesh = dts[0].device_mesh
    world = mesh.size()
    rows, cols = dts[0].shape
    if rows % world:
        out = fn(gather_rows(tensors))
        return [local_rows(o, t) for o, t in zip(out.unbind(0), dts, strict=True)]
    n, r = len(dts), rows // world
    m = math.ceil(n / world)
    group = mesh.get_group()
    local = dts[0].to_local()
    send = local.new_zeros((world * m, r, cols))  # slot o * m + j: my rows of matrix o * m + j
    send[:n].copy_(torch.stack([t.to_local() for t in dts]))
    recv = torch.empty_like(send)  # (world, m, r, cols): [src, j] = src's rows of my matrix j
    dist.all_to_all_single(recv, send, group=group)
    mine = recv.view(world, m, r, cols).transpose(0, 1).reshape(m, rows, cols)  # my m whole matrices
    done = fn(mine).to(local.dtype)  # (m, rows, cols)
    send2 = done.view(m, world, r, cols).transpose(0, 1).contiguous()  # [dst, j] = dst's rows of matrix j
    recv2 = torch.empty_like(send2)  # [src, j] = my rows of matrix src * m + j
    dist.all_to_all_single(recv2, send2, group=group)
    shards = recv2.view(world * m, r, cols)[:n]
    return [
        DTensor.from_local(s, mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
        for s, t in zip(shards.unbind(0), dts, strict=True)
    ]


def local_rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``full`` (rows, cols) as a DTensor placed like ``like`` (no communication)."""
    from torch.distributed.tensor import DTensor

    dt = _row_sharded(like)
    mesh = dt.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(full.shape[0] / world)  # torch.chunk's split, as FSDP2 and Shard(0) use
    start = min(rank * chunk, full.shape[0])
    n_local = dt.to_local().shape[0]
    local = full[start : start + n_local].contiguous()
    return DTensor.from_local(local, mesh, dt.placements, run_check=False, shape=dt.shape, stride=dt.stride())


# --- checkpoints ----------------------------------------------------------------------------------------
def _alias_names(model: nn.Module) -> set[str]:
    """Names under which a shared parameter appears a second time (the tied ``lm_head.weight``)."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def full_model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on rank 0's CPU ({} on other ranks); every rank must call it. Tied head once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    aliases = _alias_names(model)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        assert isinstance(v, torch.Tensor), f"a model state dict holds tensors, got {type(v).__name__} at {k}"
        if k not in aliases:
            out[k] = v.contiguous()
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor gathered to a full CPU tensor; every rank must call it.

    Indices and param groups are those of the single-device optimizer, so ``save_checkpoint`` writes the
    same files as without FSDP. Only rank 0 keeps the tensors (other ranks get None in their place).
    """
    sd = optimizer.state_dict()
    keep = (dist.get_rank() if dist.is_initialized() else 0) == 0
    state: dict[int, dict[str, Any]] = {}
    for idx in sorted(sd["state"]):
        entry = {}
        for key in sorted(sd["state"][idx]):
            value = sd["state"][idx][key]
            if is_dtensor(value):
                value = value.full_tensor()  # collective: same order on every rank
            if isinstance(value, torch.Tensor):
                value = value.detach().to("cpu") if keep else None
            entry[key] = value
        state[idx] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(state: dict[int, dict[str, Any]], optimizer: torch.optim.Optimizer) -> None:
    """In place: full saved tensors of DTensor parameters -> this rank's shard (before ``load_state_dict``)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, entry in state.items():
        p = params[idx]
        if not is_dtensor(p):
            continue
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
                entry[key] = local_rows(value.to(p.device), p)
