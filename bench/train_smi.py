"""nvidia-smi sampled while a block runs (clocks, power, utilisation of every GPU of the host) and the host's
CPU load meanwhile: ``bench/train_profile.py``'s record of what the GPU and the host did during timed steps."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import torch


class Smi:
    """nvidia-smi sampled every 100 ms (every GPU) while the block runs; ``summary()`` per GPU."""

    FIELDS = "index,uuid,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu"

    ENABLED = True  # bench/train_profile.py --no-smi: host load only

    def __enter__(self) -> Smi:
        self.rows: list[list[str]] = []
        self.cpu0 = _cpu_times()
        self.proc = None
        if not self.ENABLED:
            return self
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc) -> None:
        self.cpu1 = _cpu_times()
        if self.proc is not None:
            self.proc.terminate()
            out = self.proc.communicate(timeout=5)[0]
            self.rows = [[x.strip() for x in line.split(",")] for line in out.splitlines() if "," in line]

    def summary(self) -> dict:
        mine = str(torch.cuda.get_device_properties(0).uuid) if torch.cuda.is_available() else ""
        per: dict[str, dict] = {}
        for r in self.rows:
            if len(r) < 7:
                continue
            key = f"gpu{r[0]}" + (" (this)" if mine and mine in r[1] else "")
            d = per.setdefault(
                key, {"n": 0, "sm_mhz": [], "mem_mhz": [], "power_w": [], "temp_c": [], "util": []}
            )
            d["n"] += 1
            for k, v in zip(("sm_mhz", "mem_mhz", "power_w", "temp_c", "util"), r[2:7], strict=True):
                with contextlib.suppress(ValueError):
                    d[k].append(float(v))
        for d in per.values():
            for k in ("sm_mhz", "mem_mhz", "power_w", "temp_c", "util"):
                v = d[k]
                d[k] = [round(min(v), 1), round(sum(v) / len(v), 1), round(max(v), 1)] if v else None
        busy = [b - a for a, b in zip(self.cpu0, self.cpu1, strict=True)]
        return {"gpus_min_mean_max": per, "host_cpu_busy": round(1 - busy[3] / max(1, sum(busy)), 3),
                "host_load": os.getloadavg()[0], "host_cpus": os.cpu_count()}  # fmt: skip


def _cpu_times() -> list[int]:
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:8]
        return [int(x) for x in f[:4]] + [sum(int(x) for x in f[4:])]
    except OSError:
        return [0, 0, 0, 1, 0]
