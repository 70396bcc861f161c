"""The per-step progress line: MFU only where there is a peak to compare with (not on CPU); about 20 lines
a run on the console, every step in the file."""

from llmray.train.metrics import MetricsLogger


def test_progress_line_omits_mfu_on_cpu(tmp_path):
    log = MetricsLogger(tmp_path / "metrics.jsonl", max_steps=10)
    cpu = log.progress_line({"step": 3, "loss": 2.5, "mfu": 0.0})
    gpu = log.progress_line({"step": 3, "loss": 2.5, "mfu": 0.352})
    assert "mfu" not in cpu and cpu.startswith("step 3/10 | loss 2.5000")
    assert "mfu 35.2%" in gpu


def test_console_lines_every_n_steps_file_every_step(tmp_path, capsys):
    log = MetricsLogger(tmp_path / "m.jsonl", max_steps=100, resume_step=40)
    for step in range(41, 101):
        log.log({"step": step, "loss": 1.0, **({"val_loss": 2.0} if step == 63 else {})})
    printed = [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().out.splitlines()]
    assert printed == [41, 45, 50, 55, 60, 63, 65, 70, 75, 80, 85, 90, 95, 100]  # first, every 5, val, last
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 60
    MetricsLogger(tmp_path / "n.jsonl", max_steps=10, print_every=3).log({"step": 2, "loss": 1.0})
    assert capsys.readouterr().out == ""


def test_warmup_clock_times_first_steps_and_writes_its_summary_once(tmp_path):
    import json

    import torch

    from llmray.train.warmup import WarmupClock, precompile_training, precompile_while_fetching

    clock = WarmupClock(
        torch.device("cpu"), first_steps=2
    ).start()  # CPU: nothing to patch, steps still timed
    assert not clock.active
    for _ in range(3):
        clock.step_done()
    assert len(clock.step_s) == 2
    clock._restore = (object, None)  # as if started on a GPU: the first evaluation ends the clock
    clock.stop = lambda: setattr(clock, "_restore", None)  # type: ignore[method-assign]
    record: dict = {}
    clock.first_eval_done(record, 0.0, 0.0, tmp_path / "warmup.json")
    clock.first_eval_done(record, 0.0, 0.0, tmp_path / "again.json")
    summary = json.loads((tmp_path / "warmup.json").read_text())
    assert summary["first_steps_s"] == clock.step_s and "first_eval_s" in summary
    assert record["triton_compiles"] == 0 and not (tmp_path / "again.json").exists()
    w = torch.nn.Linear(2, 2)
    before = w.weight.detach().clone()
    out = precompile_training(w, torch.zeros(1, 2), torch.zeros(1, 2), torch.device("cpu"), torch.float32)
    assert out["submitted"] == 0 and torch.equal(w.weight, before)  # on CPU nothing runs
    batch, info = precompile_while_fetching(w, None, lambda: torch.ones(2, 3), (2, 3), torch.device("cpu"),
                                            torch.float32)  # fmt: skip
    assert torch.equal(batch, torch.ones(2, 3)) and info["n_errors"] == 0 and "then_waited_for_data_s" in info
