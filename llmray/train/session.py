"""The one Ray Train session wrapper of pretraining and fine-tuning, its in-process twin, and the trainer setup.

A training loop sees a ``Session``: its rank, world size and device, the checkpoint to resume from
(``resume_dir``) and ``checkpoint(metrics, write)``, which lets rank 0 write a checkpoint directory and
reports it with the metrics.

- ``RaySession``: inside a Ray Train V2 worker (``ray.train.get_context``, ``get_checkpoint``,
  ``ray.train.report``). Ray Train copies the reported directory into the run's storage itself.
- ``LocalSession``: one process, no Ray (tests, benchmarks that leave Ray's start-up off the clock).
  Checkpoints go to ``root/checkpoint_<step>`` — each a new directory written atomically by
  ``save_checkpoint``; older ones are deleted only after a newer one is complete, so a crash at any point
  leaves the last complete checkpoint to resume from.
- ``run_trainer``: the one ``TorchTrainer`` setup (scaling, run name, storage, failure and checkpoint
  config) both drivers use.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from llmray.train.loop import LEGACY_FINETUNE_STATE, STATE_FILE


class Session:
    """What a training loop needs from its runtime; the default is a single in-process worker on CPU."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        """The latest checkpoint as a local directory (valid inside the ``with``), or None."""
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Report metrics (with a checkpoint directory on rank 0 at checkpoint steps)."""

    def checkpoint(self, metrics: dict[str, Any], write: Callable[[Path], Any]) -> None:
        """Rank 0 calls ``write(dir)`` to create a checkpoint directory; every rank reports it."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                ckpt = Path(tmp) / "checkpoint"
                write(ckpt)
            self.report(metrics, ckpt)


class RaySession(Session):
    """The session of a Ray Train V2 worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._ckpt = ray.train.get_checkpoint()

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        if self._ckpt is None:
            yield None
            return
        with self._ckpt.as_directory() as d:  # a local view (downloaded if the storage is remote)
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def dataset_shard(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)


class LocalSession(Session):
    """One in-process worker; checkpoints under ``root`` (None: none kept), the ``keep`` newest kept.

    ``rank``/``world``: a process of a group the caller set up (torch.distributed without Ray, tests);
    only rank 0 writes. ``resume``: resume from this checkpoint instead of the newest under ``root``."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        root: str | Path | None = None,
        keep: int = 2,
        rank: int = 0,
        world: int = 1,
        resume: str | Path | None = None,
    ):
        self.device = torch.device(device)
        self.root = Path(root) if root is not None else None
        self.keep, self.rank, self.world = keep, rank, world
        self._resume = Path(resume) if resume is not None else None
        self.reports: list[tuple[dict[str, Any], Path | None]] = []

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary and set-aside directories are not listed)."""
        if self.root is None or not self.root.exists():
            return []
        found = [p for p in self.root.iterdir() if re.fullmatch(r"checkpoint_\d+", p.name)]
        found = [p for p in found if (p / STATE_FILE).exists() or (p / LEGACY_FINETUNE_STATE).exists()]
        return sorted(found)

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield self._resume or (found[-1] if found else None)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append((metrics, checkpoint_dir))

    def checkpoint(self, metrics: dict[str, Any], write: Callable[[Path], Any]) -> None:
        if self.root is None or self.rank != 0:
            return self.report(metrics, None)
        dest = self.root / f"checkpoint_{int(metrics['step']):08d}"
        write(dest)  # save_checkpoint: temporary sibling, then rename
        self.report(metrics, dest)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def run_trainer(
    worker: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    name: str,
    storage_path: str,
    max_failures: int,
    datasets: dict[str, Any] | None = None,
    dataset_config: Any = None,
) -> Any:
    """Run ``worker`` on a Ray Train V2 ``TorchTrainer``; returns its ``Result`` (checkpoint, error)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmray.train.ray_env import train_run_kwargs

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    kwargs: dict[str, Any] = {}
    if datasets is not None:
        kwargs.update(datasets=datasets, dataset_config=dataset_config)
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            **train_run_kwargs(),  # quiet wherever Ray was started: each step line once, Ray's INFO off
        ),
        **kwargs,
    )
    return trainer.fit()
