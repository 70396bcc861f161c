"""Every KubeRay manifest validates against the v1 CRD schemas in strict mode and passes the operator's checks.

Also: the manifests agree with each other (one image, one Ray version, GPU limits where Ray needs GPUs),
and the strict validator really catches a misspelled field, a non-string rayStartParams value,
minReplicas > maxReplicas and a TTL without shutdownAfterJobFinishes.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml
from kuberay_checks import KINDS, load_docs, operator_errors, schema_errors

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = [REPO / "ray-cluster.yaml", *sorted((REPO / "cluster").glob("*.yaml"))]
RAY_DOCS = [(p, d) for p in MANIFESTS for d in load_docs(p) if d.get("kind") in KINDS]


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    from _support.data import shared_data

    return shared_data("kuberay-crds")


def _doc(name: str) -> dict:
    (doc,) = [d for p, d in RAY_DOCS if p.name == name]
    return copy.deepcopy(doc)


def _cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return [
        {
            "RayCluster": spec,
            "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig"),
        }[doc["kind"]]
    ]


def test_inventory():
    kinds = sorted((p.name, d["kind"]) for p, d in RAY_DOCS)
    assert kinds == [
        ("ray-cluster.yaml", "RayCluster"),
        ("rayjob-finetune.yaml", "RayJob"),
        ("rayjob-pretrain.yaml", "RayJob"),
        ("rayservice.yaml", "RayService"),
    ]


@pytest.mark.parametrize("path,doc", RAY_DOCS, ids=[f"{p.name}:{d['kind']}" for p, d in RAY_DOCS])
def test_manifest_valid_strict_schema_and_operator(path, doc, crd_dir):
    assert schema_errors(doc, crd_dir) == [], f"{path.name} violates the {doc['kind']} CRD"
    assert operator_errors(doc) == [], f"{path.name} would be rejected by the KubeRay operator"


def test_misspelled_field_fails(crd_dir):
    doc = _doc("ray-cluster.yaml")
    group = doc["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")  # the typo the API server would silently prune
    errors = schema_errors(doc, crd_dir)
    assert any("minReplica" in e and "not allowed" in e for e in errors), errors
    doc = _doc("rayservice.yaml")
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("'resource' was unexpected" in e for e in schema_errors(doc, crd_dir))


def test_ray_start_params_must_be_strings(crd_dir):
    doc = _doc("ray-cluster.yaml")
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    errors = schema_errors(doc, crd_dir)
    assert any("rayStartParams/num-gpus" in e and "is not of type 'string'" in e for e in errors), errors
    for _, d in RAY_DOCS:
        for spec in _cluster_specs(d):
            groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
            assert all(isinstance(v, str) for g in groups for v in g.get("rayStartParams", {}).values())


def test_operator_rules_catch_bad_specs():
    doc = _doc("ray-cluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["minReplicas"] = 5
    assert any("minReplicas=5 > maxReplicas=4" in e for e in operator_errors(doc))
    job = _doc("rayjob-pretrain.yaml")
    job["spec"]["shutdownAfterJobFinishes"] = False
    assert any("ttlSecondsAfterFinished needs shutdownAfterJobFinishes" in e for e in operator_errors(job))
    doc = _doc("ray-cluster.yaml")
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_enable_autoscaler_v2", "value": "1"}
    )
    assert any("autoscalerOptions.version" in e for e in operator_errors(doc))
    doc = _doc("ray-cluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["restartPolicy"] = "Always"
    assert any("restartPolicy=Always" in e for e in operator_errors(doc))
    doc = _doc("ray-cluster.yaml")
    doc["metadata"]["name"] = "LLMray"
    assert any("DNS-1035" in e for e in operator_errors(doc))


def test_cluster_shape():
    """The RayCluster of the issue: autoscaler v2, a CPU head, a GPU group from zero, all ports, resources."""
    spec = _doc("ray-cluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}
    assert head["rayStartParams"]["metrics-export-port"] == str(ports["metrics"])
    env = {e["name"] for e in container["env"]}
    assert {"RAY_GRAFANA_HOST", "RAY_PROMETHEUS_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= env
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 2
    assert int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 1


@pytest.mark.parametrize("path,doc", RAY_DOCS, ids=[f"{p.name}:{d['kind']}" for p, d in RAY_DOCS])
def test_resources_image_and_version_consistent(path, doc):
    """Requests and limits on every container; one image and Ray version matching the Dockerfile."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py312-gpu" in dockerfile
    for spec in _cluster_specs(doc):
        assert spec["rayVersion"] == "2.60.0"
        templates = [spec["headGroupSpec"]["template"]] + [
            g["template"] for g in spec.get("workerGroupSpecs", [])
        ]
        for tmpl in templates:
            for c in tmpl["spec"]["containers"]:
                assert c["image"] == "llmray:0.1.0", f"{path.name}: container {c['name']} image {c['image']}"
                res = c["resources"]
                assert res["requests"] and res["limits"], f"{path.name}: {c['name']} lacks requests/limits"
                assert res["requests"] == res["limits"], f"{path.name}: {c['name']}: Ray advertises limits"
        if spec.get("enableInTreeAutoscaling"):
            assert spec["autoscalerOptions"]["resources"]["limits"]


@pytest.mark.parametrize("name", ["rayjob-pretrain.yaml", "rayjob-finetune.yaml"])
def test_rayjob_entrypoint(name):
    """python jobs/<x>.py with GPU workers enough for --num-workers, shutdown + TTL, a runtime env."""
    spec = _doc(name)["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", f"jobs/{name.removeprefix('rayjob-')[:-5]}.py"]
    assert (REPO / "jobs").is_dir()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert (
        env["working_dir"] == "/home/ray/llmray"
        and "WORKDIR /home/ray/llmray" in (REPO / "Dockerfile").read_text()
    )
    for flag in ("--out", "--storage-path"):
        if flag in argv:
            path = argv[argv.index(flag) + 1]
            assert path.startswith(("/mnt/llmray/", "s3://")), f"{flag} {path}: every Ray node must reach it"
    mounts = {
        m["mountPath"]
        for g in [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
        for m in g["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert "/mnt/llmray" in mounts
    workers = int(argv[argv.index("--num-workers") + 1])
    assert "--use-gpu" in argv
    gpus = sum(
        g["replicas"]
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert gpus >= workers, f"{name}: {workers} GPU train workers but the cluster has {gpus} GPUs"


def test_rayservice_gcs_fault_tolerance():
    spec = _doc("rayservice.yaml")["spec"]["rayClusterConfig"]
    ft = spec["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].endswith(":6379")
    assert "secretKeyRef" in ft["redisPassword"]["valueFrom"], "the Redis password must come from a Secret"
    (redis_deploy, redis_svc) = load_docs(REPO / "cluster" / "redis.yaml")
    assert redis_svc["metadata"]["name"] in ft["redisAddress"]
    assert redis_deploy["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_no_secrets_in_manifests():
    for path in [*MANIFESTS, REPO / "Dockerfile"]:
        text = path.read_text().lower()
        for needle in ("aws_secret_access_key", "sk-", "password: ", "api_key: "):
            assert needle not in text, f"{path.name} seems to embed a secret ({needle!r})"


@pytest.mark.parametrize("name", ["rayjob-pretrain.yaml", "rayjob-finetune.yaml"])
def test_rayjob_entrypoint_flags_parse(name):
    """The entrypoint's flags are ones the job script accepts (its own argparse parser, no run)."""
    import argparse
    import importlib

    command = name.removeprefix("rayjob-")[:-5]
    module = importlib.import_module("llmray.train.cli")
    parser = argparse.ArgumentParser(prog=f"jobs/{command}.py", exit_on_error=False)
    module.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([command, *shlex.split(_doc(name)["spec"]["entrypoint"])[2:]])
    assert args.use_gpu is True and args.num_workers >= 1
    if command == "pretrain":
        cfg = module.config_from_args(args)  # PretrainConfig validates the values
        assert cfg.preset == "qwen3-0.6b" and cfg.storage_path.startswith(("/mnt/llmray/", "s3://"))
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--no-such-flag"])


def test_gpu_worker_groups_agree():
    """The RayService and RayJobs use the same GPU pod shape as ray-cluster.yaml (one image, one node type)."""

    def shape(group: dict) -> tuple:
        c = group["template"]["spec"]["containers"][0]
        return group["groupName"], c["resources"]["limits"], group.get("rayStartParams", {})

    (reference,) = _doc("ray-cluster.yaml")["spec"]["workerGroupSpecs"]
    for _, doc in RAY_DOCS:
        for spec in _cluster_specs(doc):
            for group in spec["workerGroupSpecs"]:
                assert shape(group) == shape(reference), f"{doc['metadata']['name']}: {group['groupName']}"
