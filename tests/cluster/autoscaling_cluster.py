"""A local Ray cluster that autoscales for real: Ray's autoscaler v2 adds and removes (fake) GPU nodes.

``ray.cluster_utils.AutoscalingCluster`` runs the autoscaler against a fake node provider that starts
extra raylets on this machine. Its worker type mirrors ray-cluster.yaml's GPU worker group (resources
from the pod limits, min from minReplicas), and its head the CPU head (``num-gpus "0"``).

Two deviations from AutoscalingCluster as shipped, both for a shared machine: it starts with
``ray stop --force`` (which would kill every other Ray here) and reads a fake-provider example.yaml that
the Ray 2.60 wheel does not ship. ``IsolatedAutoscalingCluster`` builds the config itself (the same
provider through the ``external`` provider type) and runs the head in a private temp dir on free ports
(cluster_helpers.LocalRayHead).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from cluster_helpers import REPO, LocalRayHead, http_json, http_text
from ray.cluster_utils import AutoscalingCluster

FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
DATA_RESOURCES = ("CPU", "GPU", "MEMORY", "OBJECT_STORE_MEMORY")  # utilization > 2: never
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
            # Ray Data asks the autoscaler for another node when the cluster is over half busy (the demo's
            # tokenizing was): here the only node type is a fake GPU node, a raylet and agents that cost
            # CPU-seconds on two cores and then sit idle; GPU nodes come for GPU demand (Serve) only
            **{f"RAY_DATA_DEFAULT_CLUSTER_SCALING_UP_{r}_UTIL_THRESHOLD": "2" for r in DATA_RESOURCES},
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


def gpu_nodes(head: LocalRayHead) -> int:
    return sum(1 for n in head.alive_nodes() if n["resources_total"].get("GPU", 0) > 0)


def llm_replicas(head: LocalRayHead, app: str) -> int:
    apps = http_json(f"{head.dashboard_url}/api/serve/applications/")["applications"]
    replicas = apps[app]["deployments"]["LLMServer"]["replicas"]
    return sum(1 for r in replicas if r["state"] == "RUNNING")


def scrape_every_node(head: LocalRayHead) -> str:
    """The ``/metrics`` text of every target in Ray's Prometheus service discovery file: each node's
    metrics export port (what cluster/monitoring/podmonitor.yaml scrapes, head and GPU pods alike)."""
    groups = json.loads((Path(head.temp_dir) / "prom_metrics_service_discovery.json").read_text())
    texts = []
    for target in [t for g in groups for t in g["targets"]]:
        try:
            texts.append(http_text(f"http://{target}/metrics", timeout=30))
        except OSError:  # a node that is going away
            continue
    return "\n".join(texts)
