"""Ray's own lines that other processes send to a training command's console (the raylet's worker-pool
warning, Ray's C++ log lines from actors) go to OUT/ray.log; the workers' step lines stay on the console.
In-process: Ray's printing functions are called as Ray's listener threads call them, no cluster started."""

from __future__ import annotations

import functools

import pytest

from llmray.ray_start import start_ray
from llmray.train import ray_env

RAYLET_WARNING = (
    "WARNING: 8 PYTHON worker processes have been started on node: abc with address: 192.0.2.2, which is 4x "
    "the maximum expected startup concurrency (2)."
)
CPP_LINE = (
    "[2026-11-30 06:16:03,155 E 29594 29774] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "has constructor arguments in the object store and max_restarts > 0."
)


@pytest.fixture
def ray_worker(monkeypatch):
    """Ray's driver-side printing, restored after the test (another test's Ray in this process keeps its own)."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    monkeypatch.setattr(ray_worker, "print_to_stdstream", original)
    if hasattr(
        original, "log_file"
    ):  # an earlier run in this process diverts already: its file comes back after
        monkeypatch.setattr(original, "log_file", original.log_file)
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    monkeypatch.setattr(dispatcher, "handlers", list(dispatcher.handlers))
    # what ray.init(log_to_driver=True) registers: the workers' output, printed through the original with
    # Ray's "(actor pid=...)" prefix
    dispatcher.add_handler("ray_print_logs", functools.partial(original, ignore_prefix=False))
    return ray_worker


def test_ray_noise_goes_to_the_log_file_and_step_lines_stay(ray_worker, tmp_path, capsys):
    log = tmp_path / "ray.log"
    ray_env.divert_ray_noise(tmp_path / "an earlier run's ray.log")
    ray_env.divert_ray_noise(log)  # a later run in the process: its own log file, nothing wrapped twice
    # the raylet's message, as Ray's error listener prints it (looked up by name on each message)
    ray_worker.print_to_stdstream(
        {"lines": [RAYLET_WARNING], "pid": "raylet", "is_err": False}, ignore_prefix=False
    )
    # the workers' forwarded output, as log_to_driver's dispatcher hands it over
    step = "step 7/100 | loss 5.8912 | 812 tok/s | eta 1m02s"
    report = (
        "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(path=/x), metrics={'step': 7})"
    )
    bars = "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`."
    worker = {
        "lines": [CPP_LINE, step, report, bars],
        "pid": 4242,
        "ip": "192.0.2.2",
        "is_err": False,
        "actor_name": "W",
    }
    ray_worker.global_worker_stdstream_dispatcher.emit(worker)
    ray_worker.global_worker_stdstream_dispatcher.emit(
        {**worker, "lines": ["Traceback: a real error"], "is_err": True}
    )
    # Ray Train's PlacementGroupCleaner when two local Rays share the host: all of its output is Ray's
    cleaner = {**worker, "actor_name": "PlacementGroupCleaner", "is_err": True}
    ray_worker.global_worker_stdstream_dispatcher.emit(
        {**cleaner, "lines": ["ConnectionError: multiple Rays"]}
    )
    # Ray Train's controller on a busy CPU: a "safe to ignore" warning and its traceback, one batch
    timeout = [
        "Failed to send resource request for train-1. It's safe to ignore",
        "GetTimeoutError: not ready",
    ]
    ray_worker.global_worker_stdstream_dispatcher.emit(
        {**worker, "actor_name": "TrainController", "lines": timeout}
    )
    # on the GPU (H200): torch's c10d warning from the worker; the controller's "Failed to stop
    # PlacementGroupCleaner" traceback, its end in a later batch; our step line from a Ray Train worker
    trainer = {**worker, "actor_name": "RayTrainWorker", "pid": 2499}
    c10d = "[W1130 14:17:00.366370929 socket.cpp:207] [c10d] The hostname of the client socket cannot be retrieved."
    ray_worker.global_worker_stdstream_dispatcher.emit({**trainer, "lines": [c10d], "is_err": True})
    ray_worker.global_worker_stdstream_dispatcher.emit(
        {**trainer, "lines": ["step 1/10 | loss 4.6324 | eta 0s"]}
    )
    controller = {**worker, "actor_name": "TrainController", "pid": 2433, "is_err": True}
    failed = ["Failed to stop PlacementGroupCleaner gracefully.", "Traceback (most recent call last):"]
    ray_worker.global_worker_stdstream_dispatcher.emit({**controller, "lines": failed})
    rest = ['  File "placement_group_callback.py", line 126', "ray.exceptions.GetTimeoutError: Get timed out"]
    ray_worker.global_worker_stdstream_dispatcher.emit({**controller, "lines": rest})
    ray_worker.global_worker_stdstream_dispatcher.emit({**controller, "lines": ["a later real problem"]})
    out, err = capsys.readouterr()
    assert step in out and "Traceback: a real error" in err
    assert "\nstep 1/10 | loss 4.6324 | eta 0s\n" in "\n" + out, out  # once, without Ray's prefix
    assert "RayTrainWorker" not in out + err and "c10d" not in out + err and "a later real problem" in err
    assert "PlacementGroupCleaner" not in out + err and "line 126" not in out + err
    assert "worker processes have been started" not in out + err and "core_worker.cc" not in out + err
    assert (
        "multiple Rays" not in out + err
        and "GetTimeoutError" not in out + err
        and "TrainingReport" not in out
        and "Progress bars disabled" not in out
    )
    written = log.read_text()
    assert "(raylet) WARNING: 8 PYTHON worker processes" in written and "(W) [2026-11-30" in written
    assert "(PlacementGroupCleaner) ConnectionError: multiple Rays" in written and step not in written
    assert "(TrainController) GetTimeoutError: not ready" in written
    assert (
        "(RayTrainWorker) [W1130" in written and "(TrainController) ray.exceptions.GetTimeoutError" in written
    )


class _SlowStartRay:
    """Stands in for the ``ray`` module's init/shutdown: the node 'times out' ``failures`` times first."""

    TIMEOUT = "The current node timed out during startup. This could happen because ..."

    def __init__(self, failures: int, error: str = TIMEOUT) -> None:
        self.failures, self.error, self.inits, self.shutdowns = failures, error, 0, 0

    def init(self, **kwargs) -> None:
        self.inits += 1
        if self.inits <= self.failures:
            raise Exception(self.error)

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_ray_node_that_starts_late_is_started_again(capsys):
    """On a busy machine Ray's node can miss Ray's fixed 30 s (the demo in a fresh clone at load 97): the
    start is tried again with a line saying why, and the last failure is one sentence naming the load."""
    late = _SlowStartRay(failures=2)
    start_ray({"num_cpus": 2}, ray=late)
    assert (late.inits, late.shutdowns) == (3, 2)
    assert capsys.readouterr().out.count("did not start within 30 s") == 2
    never = _SlowStartRay(failures=9)
    with pytest.raises(
        RuntimeError, match=r"did not start within 30 s, 3 times \(this machine's load average"
    ):
        start_ray({}, ray=never)
    other = _SlowStartRay(failures=1, error="some other start-up failure")
    with pytest.raises(Exception, match="some other start-up failure"):
        start_ray({}, ray=other)
    assert other.inits == 1


def test_on_a_cluster_short_of_gpus_the_run_says_it_waits(monkeypatch, capsys):
    """On a cluster (an autoscaler may add GPU nodes) --use-gpu waits, and says for what: how many GPUs the run
    asks and the cluster has now."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    ray_env.warn_if_cluster_lacks_gpus(4)
    out = capsys.readouterr().out
    assert out.startswith(
        "waiting for 4 GPU(s): the Ray cluster has 1 now; an autoscaler may add GPU nodes"
    ), out
    ray_env.warn_if_cluster_lacks_gpus(1)
    ray_env.warn_if_cluster_lacks_gpus(0)
    assert capsys.readouterr().out == ""


def test_a_dashboard_without_its_web_build_is_not_started(tmp_path, monkeypatch):
    """On the GPU machine's Ray bundle (no dashboard/client/build) Ray's dashboard exits at start and ray.init
    waited 60 s for it before every training run: such a Ray starts without the dashboard."""
    import importlib.machinery
    import importlib.util

    def spec(name):
        found = importlib.machinery.ModuleSpec(name, None, is_package=True)
        found.submodule_search_locations = [str(tmp_path / "dashboard")]
        return found

    monkeypatch.setattr(importlib.util, "find_spec", spec)
    assert not ray_env.dashboard_can_start()
    (tmp_path / "dashboard" / "client" / "build").mkdir(parents=True)
    assert ray_env.dashboard_can_start()


def test_batch_sends_rays_messages_to_a_file(tmp_path, capfd):
    """`llmray batch` printed Ray's token-auth note, Ray Data's execution plans and a Ray Data UserWarning
    among its own lines: inside ``ray_logs_to_file`` they land in the file; errors still reach stderr; the
    loggers are as before afterwards."""
    import logging
    import warnings

    from llmray.ray_start import ray_logs_to_file

    log = tmp_path / "batch.log"
    before = logging.getLogger("ray.data").handlers[:]
    with ray_logs_to_file(log):
        logging.getLogger("ray.data._internal.execution.streaming_executor").info(
            "Execution plan of Dataset d"
        )
        logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster.")
        warnings.warn("The minimum number of concurrent actors is set to 2", UserWarning, stacklevel=1)
        logging.getLogger("ray").error("a real problem")
    out, err = capfd.readouterr()
    text = log.read_text()
    assert "Execution plan" in text and "Token authentication" in text and "concurrent actors" in text
    assert "Execution plan" not in out + err and "Token" not in out + err and "concurrent" not in out + err
    assert "a real problem" in err and logging.getLogger("ray.data").handlers == before


# what Ray 2.60's core worker wrote to the `llmray batch` console (docs/batch.md's command, 2026-11-30)
ACTOR_ARGS_LINE = (
    b"[2026-11-30 15:22:15,973 E 21083 21083] core_worker.cc:2465: Actor with class name: "
    b"'MapWorker(MapBatches(StreamingEngineActor))' and ID: '9175402a1657c3d566df211101000000' has constructor "
    b"arguments in the object store and max_restarts > 0. If the arguments in the object store go out of scope "
    b"or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more "
    b"details.\n"
)


def test_batch_sends_rays_native_actor_args_line_to_the_file_and_nothing_else(tmp_path, capfd):
    """The one C++ line Ray's core worker printed on the `llmray batch` console (written to fd 2, past
    Python's logging) goes to the log file; any other native line, a partial line and Python's own stderr
    still reach the console, in order; fd 2 and sys.stderr are as before afterwards."""
    import os
    import sys

    from llmray.batch.cli import RAY_NATIVE_NOISE
    from llmray.ray_start import native_lines_to_file

    log = tmp_path / "batch.log"
    stderr_before = sys.stderr
    with native_lines_to_file(log, RAY_NATIVE_NOISE):
        os.write(2, ACTOR_ARGS_LINE)
        os.write(2, b"[2026-11-30 15:22:16,001 E 21083 21083] core_worker.cc:812: a real native error\n")
        print("batch: 10/12 rows", file=sys.stderr)
        os.write(2, b"no newline yet")
    os.write(2, b"\nafter\n")
    err = capfd.readouterr().err
    assert "has constructor arguments" not in err and "has constructor arguments" in log.read_text()
    assert err.index("a real native error") < err.index("no newline yet") < err.index("after"), err
    assert "batch: 10/12 rows" in err and sys.stderr is stderr_before


def test_native_lines_written_just_before_a_crash_still_reach_the_console(tmp_path):
    """The filtering is a child process: what the command wrote to fd 2 before it was killed arrives."""
    import subprocess
    import sys

    code = (
        "import os, signal\n"
        "from llmray.ray_start import native_lines_to_file\n"
        f"with native_lines_to_file({str(tmp_path / 'x.log')!r}, ('noise',)):\n"
        "    os.write(2, b'noise\\n[E] core_worker.cc:1: Check failed: the real cause\\n')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9 and b"Check failed: the real cause" in proc.stderr, proc.stderr
    assert b"noise\n" not in proc.stderr


def test_a_failed_workers_traceback_goes_to_the_log_unless_debug(ray_worker, tmp_path, capsys, monkeypatch):
    """A training function that raised: Ray Train printed its traceback on the console under
    "(RayTrainWorker pid=N)"; the command's own error line says where it went. --debug keeps it here."""
    log = tmp_path / "ray.log"
    ray_env.divert_ray_noise(log)
    failed = {"pid": 23077, "ip": "192.0.2.2", "is_err": True, "actor_name": "RayTrainWorker"}
    head = [
        "Error in training function:",
        "Traceback (most recent call last):",
        '  File "finetune.py", line 303',
    ]
    emit = ray_worker.global_worker_stdstream_dispatcher.emit
    monkeypatch.delenv("LLMRAY_DEBUG", raising=False)
    emit({**failed, "lines": head})
    emit({**failed, "lines": ["    p = params[idx]", "IndexError: list index out of range"]})
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "IndexError" not in out + err
    assert "(RayTrainWorker) IndexError: list index out of range" in log.read_text()
    monkeypatch.setenv("LLMRAY_DEBUG", "1")
    emit({**failed, "lines": head})
    assert "Error in training function:" in capsys.readouterr().err
