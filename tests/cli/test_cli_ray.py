"""`llmray pretrain` on a 2-CPU Ray with one 1-CPU worker (the local `ray job submit` recipe's head): it
trains (Ray Data used to wait for good at `1.25/1 CPU ... backpressured`), each step line appears once (Ray
Train V2 forwarded every worker print twice), Ray's own logs go to OUT/ray.log."""

from __future__ import annotations

import logging
import re

import pytest

from llmray.cli import main
from llmray.train import ray_env


@pytest.fixture
def quiet_ray_two_cpus(tmp_path, monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("LLMRAY_VERBOSE", raising=False)
    for key, value in ray_env.WORKER_ENV.items():
        monkeypatch.setenv(key, value)  # restored afterwards
    log = tmp_path / "out" / "ray.log"
    # like `ray start --head --num-cpus 2`; init_ray starts it again when a busy machine misses Ray's 30 s
    ray_env.init_ray(log, num_cpus=2)
    yield log
    ray.shutdown()
    ray_logger = logging.getLogger("ray")
    for h in [h for h in ray_logger.handlers if getattr(h, "_llmray", False)]:
        ray_logger.removeHandler(h)
    ray_logger.propagate = True


@pytest.mark.timeout(420)
def test_two_cpu_head_trains_and_prints_each_step_once(quiet_ray_two_cpus, tmp_path, capfd):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Speak, speak. We are resolved rather to die than to famish?\n" * 200)
    argv = [
        "pretrain", "--data", str(corpus), "--out", str(tmp_path / "out"), "--preset", "tiny", "--max-steps", "3",
        "--seq-len", "32", "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3",
        "--warmup-steps", "1", "--eval-windows", "4", "--cpus-per-worker", "1", "--kernels", "torch",
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capfd.readouterr()
    steps = [ln for ln in captured.out.splitlines() if re.search(r"\bstep [123]/3\b", ln)]
    assert len(steps) == 3, captured.out[-3000:]
    # as if printed here: no "(RayTrainWorker pid=..)" prefix
    assert all(ln.startswith("step ") for ln in steps), steps
    ray_log = quiet_ray_two_cpus.read_text()
    for line in ("Started a local Ray instance", "Execution plan of Dataset"):  # Ray's and Ray Data's logs
        assert line in ray_log and line not in captured.out + captured.err
