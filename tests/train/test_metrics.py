"""The per-step progress line: MFU only where there is a peak to compare with (not on CPU)."""

from llmray.train.metrics import MetricsLogger


def test_progress_line_omits_mfu_on_cpu(tmp_path):
    log = MetricsLogger(tmp_path / "metrics.jsonl", max_steps=10)
    cpu = log.progress_line({"step": 3, "loss": 2.5, "mfu": 0.0})
    gpu = log.progress_line({"step": 3, "loss": 2.5, "mfu": 0.352})
    assert "mfu" not in cpu and cpu.startswith("step 3/10 | loss 2.5000")
    assert "mfu 35.2%" in gpu
