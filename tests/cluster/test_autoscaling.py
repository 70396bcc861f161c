"""Cluster autoscaling for real on one machine: Ray's autoscaler v2 adds and removes (fake) GPU nodes.

``ray.cluster_utils.AutoscalingCluster`` runs the autoscaler against a fake node provider that starts
extra raylets on this machine. Its worker type mirrors ray-cluster.yaml's GPU worker group (resources
from the pod limits, min from minReplicas), and its head the CPU head (``num-gpus "0"``). We deploy the
RayService's serve config (tiny model; ``use_gpu: true`` so every LLMServer replica needs a GPU node),
put load on it, and watch: Serve raises LLMServer to 2 replicas, the autoscaler adds a second GPU node,
and when the load stops the replica and then the idle node go away.

Two deviations from AutoscalingCluster as shipped, both for a shared machine: it starts with
``ray stop --force`` (which would kill every other Ray here) and reads a fake-provider example.yaml that
the Ray 2.60 wheel does not ship. ``IsolatedAutoscalingCluster`` builds the config itself (the same
provider through the ``external`` provider type) and runs the head in a private temp dir on free ports.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cluster_helpers import BIN, REPO, LocalRayHead, free_port, http_json, local_serve_config, wait_for
from ray.cluster_utils import AutoscalingCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
KEY = "test-key"
MAX_LOCAL_WORKERS = 2  # the manifest allows more; two raylets are what a 2-core machine can start


def worker_types_from_manifest() -> tuple[dict, dict]:
    """(head resources, {group name: fake node type}) from ray-cluster.yaml."""
    (doc,) = [d for d in yaml.safe_load_all((REPO / "ray-cluster.yaml").read_text()) if d]
    spec = doc["spec"]
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    head = {"CPU": int(head_limits["cpu"]), "GPU": int(spec["headGroupSpec"]["rayStartParams"]["num-gpus"])}
    types = {}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        types[group["groupName"]] = {
            # Logical resources as Ray would advertise the pod; a small object store (shared machine).
            "resources": {
                "CPU": int(limits["cpu"]),
                "GPU": int(limits.get("nvidia.com/gpu", 0)),
                "object_store_memory": 200_000_000,
            },
            "node_config": {},
            "min_workers": group["minReplicas"],
            "max_workers": min(group["maxReplicas"], MAX_LOCAL_WORKERS),
        }
    return head, types


class IsolatedAutoscalingCluster(AutoscalingCluster):
    """AutoscalingCluster (autoscaler v2) that leaves other Ray instances alone (see the module docstring)."""

    def __init__(self, head_resources: dict, worker_node_types: dict, idle_timeout_minutes: float):
        super().__init__(
            head_resources, worker_node_types, autoscaler_v2=True, idle_timeout_minutes=idle_timeout_minutes
        )

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        return {
            "cluster_name": "llmray-fake",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            "provider": {
                "type": "external",
                "module": FAKE_PROVIDER,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "launch_multiple": autoscaler_v2,
                "head_node_id": FAKE_HEAD_NODE_ID,
            },
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0,
            # The rest of the fake provider's example.yaml: empty, but prepare_config needs the keys.
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            **{
                k: []
                for k in (
                    "initialization_commands",
                    "setup_commands",
                    "head_setup_commands",
                    "worker_setup_commands",
                    "head_start_ray_commands",
                    "worker_start_ray_commands",
                )
            },
            **config_kwargs,
        }

    def start(self, _system_config=None, override_env=None) -> LocalRayHead:
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        env = {
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            **(override_env or {}),
        }
        res = self._head_resources
        self.head = LocalRayHead(num_cpus=res["CPU"], num_gpus=res.get("GPU", 0), env=env)
        self._config["provider"]["gcs_address"] = self.head.gcs_address  # workers join this head
        config_file = Path(self.head.temp_dir) / "autoscaling.json"
        config_file.write_text(json.dumps(self._config))
        self.head.cmd.append(f"--autoscaling-config={config_file}")
        return self.head.start()

    def shutdown(self) -> None:
        self.head.stop()

    def autoscaler_log(self, lines: int = 40) -> str:
        """The tail of the autoscaler's logs (for failure messages)."""
        logs = Path(self.head.temp_dir) / "session_latest" / "logs"
        parts = []
        for name in ("monitor.err", "monitor.log"):
            path = logs / name
            if path.exists():
                parts.append(
                    f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                )
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster():
    head_resources, types = worker_types_from_manifest()
    assert head_resources["GPU"] == 0 and types["gpu-workers"]["resources"]["GPU"] == 1
    assert types["gpu-workers"]["min_workers"] == 0 and types["gpu-workers"]["max_workers"] == 2
    c = IsolatedAutoscalingCluster(head_resources, types, idle_timeout_minutes=0.1)
    try:
        c.start()
        yield c
    finally:
        c.shutdown()


def gpu_nodes(head: LocalRayHead) -> int:
    return sum(1 for n in head.alive_nodes() if n["resources_total"].get("GPU", 0) > 0)


def llm_replicas(head: LocalRayHead, app: str) -> int:
    apps = http_json(f"{head.dashboard_url}/api/serve/applications/")["applications"]
    replicas = apps[app]["deployments"]["LLMServer"]["replicas"]
    return sum(1 for r in replicas if r["state"] == "RUNNING")


def test_serve_load_adds_gpu_node_and_idle_removes_it(cluster, tiny_model_dir, tmp_path, record_property):
    head = cluster.head
    t0, timeline = time.monotonic(), {}

    def mark(event: str) -> None:
        timeline[event] = round(time.monotonic() - t0, 1)
        print(f"[autoscaling] +{timeline[event]:6.1f}s {event}", flush=True)

    assert gpu_nodes(head) == 0, "the GPU group starts at minReplicas=0"
    port = free_port()
    (doc,) = [d for d in yaml.safe_load_all((REPO / "cluster" / "rayservice.yaml").read_text()) if d]
    config = local_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]), tiny_model_dir, tmp_path)
    config.update(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    (app,) = config["applications"]
    assert app["args"]["use_gpu"] is True
    app["args"].update(
        api_key=KEY, min_replicas=1, max_replicas=2, target_ongoing_requests=1, max_ongoing_requests=4,
        ingress_replicas=1, ingress_num_cpus=0.1,
        engine_kwargs={"max_num_seqs": 4, "max_model_len": 512, "num_kv_blocks": 128},
        autoscaling_overrides={"upscale_delay_s": 0.5, "downscale_delay_s": 3.0, "metrics_interval_s": 0.5, "look_back_period_s": 1.0},
    )  # fmt: skip
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    proc = head.run_cli(
        [str(BIN / "serve"), "deploy", str(cfg_file), "--address", head.dashboard_url], timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # The first LLMServer replica needs {"GPU": 1}: the autoscaler launches the first GPU node for it.
    try:
        wait_for(
            lambda: llm_replicas(head, app["name"]) == 1,
            180,
            what="the first LLMServer replica on a new GPU node",
        )
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{cluster.autoscaler_log()}") from None
    assert gpu_nodes(head) == 1
    mark("1 GPU node, 1 LLMServer replica (scaled from 0 nodes)")

    stop, statuses = threading.Event(), []

    def load(i: int) -> None:
        body = {
            "model": app["args"]["served_model_name"],
            "prompt": f"load {i}",
            "max_tokens": 200,
            "stream": True,
        }
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
            while not stop.is_set():
                with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                    statuses.append(r.status_code)
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        mark("load started (4 streaming clients)")
        wait_for(lambda: gpu_nodes(head) == 2, 150, what="the autoscaler to add a second GPU node")
        mark("2 GPU nodes")
        wait_for(lambda: llm_replicas(head, app["name"]) == 2, 120, what="a second LLMServer replica")
        mark("2 LLMServer replicas")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    mark(f"load stopped ({len(statuses)} requests, all 200)")

    # Idle: Serve drops back to min_replicas, then the autoscaler removes the idle GPU node.
    wait_for(lambda: llm_replicas(head, app["name"]) == 1, 90, what="LLMServer back to 1 replica")
    mark("1 LLMServer replica")
    wait_for(lambda: gpu_nodes(head) == 1, 90, what="the idle GPU node to be removed")
    mark("1 GPU node (idle node removed)")
    assert llm_replicas(head, app["name"]) == 1
    record_property("autoscaling_timeline_s", json.dumps(timeline))
