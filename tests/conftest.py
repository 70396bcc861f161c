"""Shared fixtures: the tiny model, a saved tiny model directory, shared data, a local Ray shared by modules."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

# OpenMP threads that spin while waiting starve every other process on a 2-core CI machine (Ray workers, the
# engine core, serve replicas: CPU steps ran ~30x slower under load): wait passively. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Every Ray a test starts (ray.init here, `ray start` heads, subprocesses, Ray jobs) inherits these:
# - no prestarted workers: a raylet starts one idle Python worker per logical CPU (8 here, ~3 CPU-s each
#   on two cores) when the first driver connects, and most were never used; workers start on demand;
# - no Ray Train preemption watcher: an extra actor per Train run that polls for cloud node drains.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# - workers at nice 0, not Ray's 15: beside `make test`'s other xdist worker (in-process tests at nice 0) a
#   Ray module's workers got a few % of a core, so it stretched (its Ray's daemons ticking all along: the
#   local-cluster module took 674 s instead of ~300 in a full run) and could end the run alone on one core;
os.environ.setdefault("RAY_worker_niceness", "0")
# and longer start-up waits than Ray's (60 s for the dashboard, 15-30 s for the agents, 60 s for a new
# worker process to register and for a Ray Train worker group to start), which a 2-core machine running
# two test workers can exceed
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "180")
os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
os.environ.setdefault("RAY_worker_register_timeout_seconds", "300")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
# Serve's controller kills an HTTP proxy that is not ready within 5 s (10 s per health check): under load
# `serve deploy` then failed with "ProxyActor ... killed by ray.kill" (CI, 2026-11-30). `llmray serve` sets
# the same ready timeout for the same reason.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")

import torch  # noqa: E402

# Triton decides at kernel-definition time whether to interpret: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.config import ModelConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _support.data import shared_data  # noqa: E402,F401  (re-exported for tests)
from _support.ray_start import ray_init  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    from llmray.model.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(tiny_config, kernels="torch").eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny checkpoint with a byte-level BPE tokenizer trained on a small text (session-wide)."""
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.model.tokenizer import train_bpe

    # a fixed text (an old README), so editing the real README never changes the tests' tokenizer
    text = (Path(__file__).parent / "_support" / "tokenizer_corpus.txt").read_text()
    tok = train_bpe([text] * 4, vocab_size=400)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg, kernels="torch")
    out = tmp_path_factory.mktemp("tiny_model")
    save_model(model, out, tokenizer=tok)
    return out


# The slowest test modules, in seconds on the 2-core CI machine (durations from a full run). `make test`
# runs two pytest-xdist workers, a module each at a time (--dist loadfile --no-loadscope-reorder): these
# start first, longest first, so the two workers finish together instead of one running a two-minute module
# alone at the end. Order only: a module not named here runs after these, in the usual order. The
# RAY_LOCAL_MODULES below are one unit of work (~310 s together), placed where the first of them is.
SLOW_MODULES = {
    "cluster/test_local_cluster.py": 400,  # the demo as a Ray job, then the RayService deploy + autoscaling
    "train/test_pretrain.py": 170,
    "serve/test_serve_app.py": 90,
    "serve/test_serve_replicas.py": 90,
    "batch/test_batch.py": 60,
    "train/test_finetune.py": 60,
    "cli/test_cli_ray.py": 55,
    "engine/test_engine_core.py": 25,
    "train/test_data.py": 22,
    "train/test_fsdp.py": 20,
    "model/test_model_kernels.py": 17,
    "serve/test_structured_serve.py": 16,
    "serve/test_serve_lora.py": 15,
}


# The modules that use ``ray_local`` run on ONE xdist worker, one after another, on one Ray (``ray_local`` stays
# up between them): each Ray start costs ~20 CPU-s (its daemons and Ray Data's three helper actors) and a later
# module reuses the earlier ones' idle worker processes (~3 CPU-s each). A module missing here still runs, on its
# own Ray. Order: as in SLOW_MODULES.
RAY_LOCAL_MODULES = (
    "train/test_pretrain.py",
    "batch/test_batch.py",
    "train/test_finetune.py",
    "train/test_data.py",
)
# Likewise the modules that use ``serve_local`` (one Ray + Serve; each start costs ~40 CPU-s of Ray's and Serve's
# processes on two cores): one unit of work, one session.
SERVE_LOCAL_MODULES = (
    "serve/test_serve_app.py",
    "serve/test_serve_replicas.py",
)
UNITS = {"ray_local modules": RAY_LOCAL_MODULES, "serve_local modules": SERVE_LOCAL_MODULES}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which the GPU machine may not have
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` with RAY_LOCAL_MODULES and SERVE_LOCAL_MODULES as units of work (xdist hands out
    whole units)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class OneRayLocalWorker(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return next((unit for unit, mods in UNITS.items() if path.removeprefix("tests/") in mods), path)

    return OneRayLocalWorker(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike; a plain run keeps the file order
        items.sort(key=lambda i: -SLOW_MODULES.get(_under_tests(i.path), 0))  # stable: modules stay whole


def _under_tests(path: Path) -> str:
    tests = Path(__file__).resolve().parent
    return path.relative_to(tests).as_posix() if path.is_relative_to(tests) else str(path)


# Per xdist worker: seconds spent per module (setup + call + teardown) and when its last test ended, printed at
# the end of a `make test` run, so SLOW_MODULES can be kept in step with CI (the two workers should end together).
_WORKER_MODULES: dict[str, dict[str, float]] = {}
_WORKER_DONE: dict[str, float] = {}
_T0 = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    node = getattr(report, "node", None)  # set by xdist on the controller
    if node is None:
        return
    worker = str(node.gateway.id)
    module = report.location[0].removeprefix("tests/")
    mods = _WORKER_MODULES.setdefault(worker, {})
    mods[module] = mods.get(module, 0.0) + report.duration
    _WORKER_DONE[worker] = time.monotonic() - _T0


def pytest_terminal_summary(terminalreporter) -> None:
    if not _WORKER_MODULES:
        return
    terminalreporter.write_sep("-", "xdist workers: busy seconds, end time, modules >= 15 s in run order")
    for worker in sorted(_WORKER_MODULES):
        mods = _WORKER_MODULES[worker]
        slow = ", ".join(f"{m} {s:.0f}" for m, s in mods.items() if s >= 15)
        terminalreporter.write_line(
            f"{worker}: busy {sum(mods.values()):.0f} s, done at {_WORKER_DONE[worker]:.0f} s, "
            f"{len(mods)} modules; {slow}"
        )


_RAY: dict[str, str] = {}  # the gcs address of the Ray that ray_local started, while it runs
_NEXT: dict[str, pytest.Item | None] = {}  # the item this process runs next (None: none)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    _NEXT["item"] = nextitem  # read by ray_local's teardown, which runs after this


@pytest.fixture(scope="module")
def ray_local(request):
    """A local Ray with more logical CPUs than the 2-core CI machine has, shared by modules.

    Starting Ray costs ~10 s on two cores, so modules that use this fixture share one: after a module it
    stays up when this process's next test uses it too (`make test` runs RAY_LOCAL_MODULES one after
    another on one worker), or goes on in the same folder where a later module uses it (modules between
    them find it idle), and stops otherwise. A module reuses it only if nobody
    replaced it (Serve and CLI tests start and stop Ray of their own). Tests must not leave Serve apps,
    named actors or placement groups behind. Train workers, Ray Data and Serve replicas must request
    fractional CPUs, or they wait forever.
    """
    import ray

    if not (_RAY and ray.is_initialized() and _gcs_address(ray) == _RAY["gcs"]):
        if ray.is_initialized():
            ray.shutdown()
        _init_ray(ray)
        _RAY["gcs"] = _gcs_address(ray)
    yield ray
    if _wanted_next(request) and ray.is_initialized() and _gcs_address(ray) == _RAY["gcs"]:
        return  # a later module of this folder takes it over
    _RAY.clear()
    ray.shutdown()


def _init_ray(ray) -> None:
    """ray.init, once more if the raylet took longer than Ray's fixed 30 s to register (an overloaded host)."""
    ray_init(attempts=2, num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)


def _gcs_address(ray) -> str:
    return str(ray.get_runtime_context().gcs_address)


def _wanted_next(request, fixture: str = "ray_local") -> bool:
    """Whether this process's next module uses ``fixture``, or it goes on in this module's folder and a
    module there uses ``fixture`` later."""
    nxt, folder = _NEXT.get("item"), request.node.path.parent
    if nxt is None:
        return False
    items = request.session.items
    if any(i.path == nxt.path and fixture in i.fixturenames for i in items):
        return True
    if nxt.path.parent != folder:
        return False
    start = next((n for n, i in enumerate(items) if i is nxt), len(items))
    return any(i.path.parent == folder and fixture in i.fixturenames for i in items[start:])


_SERVE: dict = {}  # the session serve_local started (its context manager, the session, its Ray's gcs address)


@pytest.fixture(scope="module")
def serve_local(request):
    """A local Ray + Serve with Ray's metrics exported on a port (``session.metrics_port``), shared like
    ``ray_local``: it stays up for this process's next module when that one uses it too (SERVE_LOCAL_MODULES run
    one after another on one worker). Each module's llmray app is deleted at its end."""
    import ray
    from serve_helpers import free_port, serve_session  # tests/serve/, on sys.path for its modules

    if not (_SERVE and ray.is_initialized() and _gcs_address(ray) == _SERVE["gcs"]):
        _stop_serve_local()
        metrics_port = free_port()
        cm = serve_session(metrics_port=metrics_port)
        session = cm.__enter__()
        session.metrics_port = metrics_port
        _SERVE.update(cm=cm, session=session, gcs=_gcs_address(ray))
    yield _SERVE["session"]
    _SERVE["session"].delete()
    if _wanted_next(request, "serve_local") and ray.is_initialized() and _gcs_address(ray) == _SERVE["gcs"]:
        return
    _stop_serve_local()


def _stop_serve_local() -> None:
    import ray

    if _SERVE:
        if ray.is_initialized() and _gcs_address(ray) == _SERVE["gcs"]:  # not a Ray started since
            _SERVE["cm"].__exit__(None, None, None)  # serve.shutdown(), ray.shutdown()
        _SERVE.clear()


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
