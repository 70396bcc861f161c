"""Starting (or joining) Ray for a training command, quietly: our lines on the console, Ray's in a file.

``init_ray(log_file)`` joins RAY_ADDRESS / a running ``ray start``, or starts an embedded local Ray. Ray's
own driver-side logs (start-up, Ray Data execution plans and progress, Ray Train controller messages) go
to ``log_file`` and the console shows warnings and errors only; Ray Data's progress bars are off; Ray Train
V2's print patch is off in the workers (it forwarded each worker ``print`` twice), so every step line
appears once. ``LLMRAY_VERBOSE=1`` keeps Ray's logs on the console too.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # Ray Train V2 tees print() to stdout and to a logger: twice
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # hundreds of progress-bar lines per run in a log file
}
# workers only: a worker's Ray Data INFO lines (execution plans) reach the console through log_to_driver
WORKER_ONLY_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING"}
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
# Ray's own lines that other processes send to the driver's console (the workers' step lines are ours):
# Ray's C++ log lines, the raylet's worker-pool warning (2-core hosts), Ray Train's INFO line per report
RAY_NOISE = (
    re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWEF] \d+ \d+\] \w+\.cc:\d+: "),
    re.compile(r"worker processes have been started on node"),
    re.compile(r"^Reporting training result \d+: TrainingReport\("),
    re.compile(r"^Progress bars disabled\. To enable, set "),  # Ray Data, once per worker that reads
    re.compile(r"^\[[WI]\d{4} \d\d:\d\d:\d\d\.\d+ [^\]]*\] "),  # torch's C++ warnings (c10d's hostname one)
)
# Ray's own actors whose output is all Ray's: Ray Train V2's PlacementGroupCleaner prints a traceback when two
# local Rays run on one host (its State API call finds both and picks neither)
RAY_QUIET_ACTORS = ("PlacementGroupCleaner",)
# a message whose traceback follows it in the same batch of lines: the whole batch is Ray's (Ray Train's
# controller, when a busy CPU delays its autoscaling request: "safe to ignore", it says; its PlacementGroupCleaner
# not stopping within 12 s at the end of a run, while its State API call is still out)
RAY_NOISE_BATCHES = (
    re.compile(r"Failed to send resource request for "),
    re.compile(r"Failed to stop PlacementGroupCleaner gracefully"),
)
# the rest of such a traceback, when Ray sends it in later batches
TRACEBACK_LINE = re.compile(r"^(\s|Traceback \(most recent call last\)|[\w.]+(Error|Exception|Exit)\b)")
# the actors whose stdout is ours: the training function's step lines, printed without Ray's "(RayTrainWorker
# pid=...)" prefix (their stderr, e.g. a traceback, keeps it)
OUR_ACTORS = ("RayTrainWorker",)
# a failed training function's traceback (Ray Train prints it in the worker): to the log file, as the command's
# own error line says, unless --debug / LLMRAY_DEBUG=1
WORKER_TRACEBACK = re.compile(r"^(Error in training function|Traceback \(most recent call last\))")


def _debug() -> bool:
    return os.environ.get("LLMRAY_DEBUG", "") not in ("", "0")


def verbose() -> bool:
    return os.environ.get("LLMRAY_VERBOSE", "") not in ("", "0")


def route_ray_logs(log_file: str | Path | None) -> Path | None:
    """Ray's driver-side loggers into ``log_file`` (INFO and up); WARNING and up stay on the console."""
    if verbose():
        return None
    path = Path(log_file) if log_file else None
    handlers: list[logging.Handler] = []
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(logging.INFO)
        handlers.append(fh)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR)
    console.setFormatter(logging.Formatter("ray %(levelname)s: %(message)s"))
    handlers.append(console)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if getattr(h, "_llmray", False) or isinstance(h, logging.StreamHandler):
                logger.removeHandler(h)
        if name == "ray":
            for h in handlers:
                h._llmray = True  # type: ignore[attr-defined]  # our mark on a Handler: the next call finds and replaces it
                logger.addHandler(h)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        else:
            logger.propagate = True  # up to "ray"
    return path


def _job_env_vars() -> set[str]:
    """Env var names a ``ray job submit`` runtime env already sets (ray.init must not set them again)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def init_ray(
    log_file: str | Path | None = None, gpus: int = 0, worker_output: bool = True, **local_kwargs: object
) -> Path | None:
    """Join or start Ray (nothing when already initialized); returns the file Ray's logs go to.

    ``gpus``: what the run will ask for (a note when a cluster has fewer). ``worker_output``: forward the
    workers' prints (step lines) to this console. ``local_kwargs`` (e.g. ``num_cpus``) apply only when an
    embedded local Ray is started.
    """
    import ray

    if ray.is_initialized():
        return None
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)  # the driver itself, and an embedded Ray's workers
    import ray.data  # configures Ray Data's loggers: route them after that

    path = route_ray_logs(log_file)
    taken = _job_env_vars()
    env_vars = {k: os.environ[k] for k in WORKER_ENV if k not in taken}
    if not verbose():
        env_vars.update({k: v for k, v in WORKER_ONLY_ENV.items() if k not in taken and k not in os.environ})
    from llmray.ray_start import start_ray
    from llmray.train.preflight import local_ray_starts

    kwargs: dict[str, Any] = dict(  # ray.init's keywords
        runtime_env={"env_vars": env_vars},
        configure_logging=verbose(),
        log_to_driver=worker_output or verbose(),
    )
    if local_ray_starts():
        # the dashboard stays (Ray's default): without its State API, Ray Train V2's PlacementGroupCleaner
        # can take a busy controller for dead and remove the workers' placement group mid-run. A Ray whose
        # dashboard has no web build (some bundles) fails to start it after 60 s: then none, at once
        if not dashboard_can_start():
            kwargs["include_dashboard"] = False
        kwargs.update(local_kwargs)
    if path is not None:
        print(f"Ray's logs: {path}", flush=True)
    # ray.init drops the "ray" logger's handlers and then logs (e.g. the token-auth warning): while it
    # runs, records that find no handler go to Ray's log file instead of Python's stderr fallback
    fallback = logging.lastResort
    if path is not None:
        logging.lastResort = logging.FileHandler(path)
        logging.lastResort.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        start_ray(kwargs)  # again when the node misses Ray's fixed 30 s (a busy machine)
    finally:
        handler = logging.lastResort
        if handler is not None and handler is not fallback:
            handler.close()
        logging.lastResort = fallback
    route_ray_logs(log_file)  # route again after ray.init
    if path is not None and not verbose():
        divert_ray_noise(path)
    ray.data.DataContext.get_current().enable_progress_bars = False
    warn_if_cluster_lacks_gpus(gpus)
    return path


def dashboard_can_start() -> bool:
    """Whether this Ray's dashboard has its web build: without it Ray's dashboard process exits at start and
    ``ray.init`` waits 60 s for it first."""
    import importlib.util

    spec = importlib.util.find_spec("ray.dashboard")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "client" / "build").is_dir() for p in spec.submodule_search_locations)


class _DivertRayNoise:
    """Ray's ``print_to_stdstream`` with the lines matching ``RAY_NOISE`` written to ``log_file`` instead, and
    the training workers' own lines printed without Ray's prefix."""

    def __init__(self, original: Any, log_file: Path) -> None:
        self.original, self.log_file = original, log_file
        self.in_traceback: set[Any] = set()  # pids whose Ray traceback goes on in the next batch

    def __call__(self, data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = data.get("lines") or []
        pid = data.get("pid")
        quiet = data.get("actor_name") in RAY_QUIET_ACTORS or any(
            p.search(ln) for p in RAY_NOISE_BATCHES for ln in lines
        )
        if data.get("actor_name") in OUR_ACTORS and data.get("is_err") and not _debug():
            quiet = quiet or any(WORKER_TRACEBACK.search(ln) for ln in lines)
        if not quiet and pid in self.in_traceback:
            quiet = bool(lines) and all(TRACEBACK_LINE.search(ln) for ln in lines)
        if quiet and data.get("actor_name") not in RAY_QUIET_ACTORS:
            self.in_traceback.add(pid)
        else:
            self.in_traceback.discard(pid)
        noise = [ln for ln in lines if quiet or any(p.search(ln) for p in RAY_NOISE)]
        if noise:
            with open(self.log_file, "a") as f:
                f.writelines(f"({data.get('actor_name') or pid}) {ln}\n" for ln in noise)
            lines = [ln for ln in lines if ln not in noise]
            if not lines:
                return
            data = {**data, "lines": lines}
        if data.get("actor_name") in OUR_ACTORS and not data.get("is_err"):
            ignore_prefix = True  # our step lines: as if printed here
        self.original(data, ignore_prefix=ignore_prefix)


def divert_ray_noise(log_file: Path) -> None:
    """Lines matching ``RAY_NOISE`` that reach this driver from Ray's processes go to ``log_file`` instead
    of the console: the raylet's messages (Ray's error listener prints them whatever ``log_to_driver``
    says) and the forwarded output of workers and actors. Every other line is printed as before. A later
    run in the same process (tests, a notebook) moves the noise to its own ``log_file``."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if isinstance(original, _DivertRayNoise):
        original.log_file = log_file
        return
    divert = _DivertRayNoise(original, log_file)
    ray_worker.print_to_stdstream = divert  # looked up per message by Ray's error listener
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    for name, handler in list(dispatcher.handlers):  # log_to_driver's handler holds the original function
        if isinstance(handler, functools.partial) and handler.func is original:
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, functools.partial(divert, **handler.keywords))


def train_run_kwargs() -> dict[str, Any]:
    """``RunConfig`` keywords that keep a Ray Train run quiet wherever Ray was started (tests, jobs).

    Worker env: one print per step line, no progress bars, Ray Data warnings only; Ray Train's own
    log level WARNING (its INFO lines stay in the session's log files). Empty with ``LLMRAY_VERBOSE=1``.
    """
    if verbose():
        return {}
    from ray.train import LoggingConfig

    taken = _job_env_vars()
    env = {k: v for k, v in {**WORKER_ENV, **WORKER_ONLY_ENV}.items() if k not in taken}
    return {"worker_runtime_env": {"env_vars": env}, "logging_config": LoggingConfig(log_level="WARNING")}


def warn_if_cluster_lacks_gpus(num_gpus: int) -> None:
    """On a cluster, say so when it has fewer GPUs than asked (an autoscaler may add them: we wait)."""
    import ray

    if num_gpus <= 0:
        return
    have = int(ray.cluster_resources().get("GPU", 0))
    if have < num_gpus:
        print(
            f"waiting for {num_gpus} GPU(s): the Ray cluster has {have} now; an autoscaler may add GPU "
            "nodes (Ctrl-C to stop)",
            flush=True,
        )
