"""Autoscaling: under load the engine deployment goes from 1 to 2 replicas, and back to 1 when idle.

The engine core process runs the paced engine double (``tests/_support/paced_engine.py``: 20 ms steps, no
model): what scales is the deployment, and a second replica is ready in seconds rather than after loading
torch and a model; the rest is the real serving stack (``AsyncLLM``, the core process, ``LLMServer``, the
ingress). Short autoscaling delays; replicas ask for a quarter CPU each (Ray has 8 logical CPUs on the
2-core CI machine), or the second one would never be placed.
"""

from __future__ import annotations

import threading

import httpx
import pytest
from _support.paced_engine import write_tokenizer_dir
from serve_helpers import KEY, replica_count, serve_app, wait_for

pytestmark = pytest.mark.timeout(240)
MODEL = "tiny"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    args = {
        "model": str(write_tokenizer_dir(tmp_path_factory.mktemp("paced"))),
        "served_model_name": MODEL,
        "engine_factory": "_support.paced_engine:PacedAsyncLLM",
        "api_key": KEY,
        "engine_kwargs": {"max_num_seqs": 8, "max_model_len": 512, "step_ms": 20},
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "autoscaling_overrides": {
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 2.0,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 1.0,
        },
        "num_cpus": 0.25,
    }
    with serve_app(args) as base:
        yield base


def test_scales_up_under_load_and_back_down(url):
    assert replica_count() == 1
    stop = threading.Event()
    statuses: list[int] = []

    def load(i: int) -> None:
        body = {"model": MODEL, "prompt": f"load {i}", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
            while not stop.is_set():
                with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    statuses.append(r.status_code)
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: replica_count() == 2, 60, interval_s=0.5), "never scaled to 2 replicas"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert wait_for(lambda: replica_count() == 1, 60, interval_s=0.5), "never scaled back to 1 replica"
