"""`make demo` says it is alive during a stage: one line per quarter of a run's steps, read from the run's
metrics.jsonl while it is written (rows of an earlier run in the same file are not this run's)."""

from __future__ import annotations

import json
import time

from llmray.demo import final_step_line, follow_steps, output_to


def _row(step: int, loss: float) -> str:
    return json.dumps({"step": step, "loss": loss, "lr": 1e-3}) + "\n"


def test_a_line_per_quarter_of_the_steps(tmp_path, capsys):
    """The first step, then each quarter: the loss averaged over the last 10 steps (one batch's is noisy);
    the run's own prints go to the log file meanwhile, the step lines still reach the console."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(_row(400, 0.5))  # an earlier run into the same --out: not this one's progress
    log = tmp_path / "ray.log"
    with follow_steps(metrics, total=40, t0=time.time(), poll_s=0.01), output_to(log):
        print("fine-tuning runs/base on 720 examples")  # a training run's own driver line
        for step in range(1, 41):
            with metrics.open("a") as f:
                f.write(_row(step, 5.0 - step / 10))
            if step % 10 == 0:
                time.sleep(0.1)  # the watcher reads while the run goes on
        with metrics.open("a") as f:
            f.write('{"step": 41, "lo')  # a line still being written
        time.sleep(0.1)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("(t+")[0].strip() for ln in lines] == [
        "step 1/40  loss 4.90",
        "step 10/40  loss 4.45",  # steps 1-10
        "step 20/40  loss 3.45",  # steps 11-20
        "step 30/40  loss 2.45",
    ], lines
    assert "720 examples" in log.read_text()
    assert final_step_line(metrics, 40) == "  step 40/40  loss 1.45"  # the stage's summary: steps 31-40


def test_a_taken_port_is_refused_before_anything_starts(tmp_path, capsys):
    import socket

    from llmray.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --port {port} is taken") and "\n" not in err, err
    assert not (tmp_path / "d").exists()
