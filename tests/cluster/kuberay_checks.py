"""Offline checks of KubeRay manifests: the CRD's openAPIV3Schema in strict mode, plus the operator's rules.

The Kubernetes API server prunes unknown fields of a custom resource silently (a misspelled
``minReplica`` is simply dropped), so plain CRD validation misses the commonest mistake. ``strict_schema``
closes every object that declares ``properties`` (``additionalProperties: false``) unless the CRD marks it
``x-kubernetes-preserve-unknown-fields``; then a typo fails validation. ``operator_errors`` adds the checks
the KubeRay operator and its webhook make at reconcile time (ray-operator/controllers/ray/utils/
validation.go, KubeRay v1.7), which the schema cannot express.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
# KubeRay appends 6 characters to RayJob/RayService names for the RayCluster it creates.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# metadata is `type: object` without properties in the CRD (the API server validates ObjectMeta
# itself); the subset a manifest in this repository may use.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` where every object with ``properties`` rejects unknown fields."""
    out = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(out)
    return out


@functools.cache
def validator(kind: str, crd_dir: str) -> jsonschema.Draft7Validator:
    """Strict validator for ``kind`` from ``<crd_dir>/ray.io_<plural>.yaml`` (version v1)."""
    crd = yaml.load((Path(crd_dir) / f"ray.io_{KINDS[kind]}.yaml").read_text(), Loader=yaml.CSafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict[str, Any], crd_dir: Path) -> list[str]:
    """Strict-schema violations of one manifest, as ``path: message`` lines (empty when valid)."""
    errors = validator(doc["kind"], str(crd_dir)).iter_errors(doc)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def _env_names(container: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def cluster_spec_errors(spec: dict[str, Any], annotations: dict[str, str], where: str) -> list[str]:
    """The operator's RayCluster rules (ValidateRayClusterSpec and the webhook's worker-group checks)."""
    errs: list[str] = []
    head = spec["headGroupSpec"]
    head_containers = head["template"]["spec"].get("containers", [])
    if not head_containers:
        return [f"{where}: headGroupSpec needs at least one container"]
    groups = spec.get("workerGroupSpecs", [])
    names = [g["groupName"] for g in groups]
    if len(names) != len(set(names)):
        errs.append(f"{where}: worker group names {names} are not unique")
    for g in groups:
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        if lo > hi:
            errs.append(f"{where}: group {g['groupName']}: minReplicas={lo} > maxReplicas={hi}")
        if "replicas" in g and not lo <= g["replicas"] <= hi:
            errs.append(f"{where}: group {g['groupName']}: replicas={g['replicas']} outside [{lo}, {hi}]")
        if not g["template"]["spec"].get("containers"):
            errs.append(f"{where}: group {g['groupName']} needs at least one container")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    v2_env = "RAY_enable_autoscaler_v2" in _env_names(head_containers[0])
    version = (spec.get("autoscalerOptions") or {}).get("version")
    if autoscaling and version and v2_env:
        errs.append(
            f"{where}: both autoscalerOptions.version and the head env RAY_enable_autoscaler_v2 are set; "
            "the operator accepts only autoscalerOptions.version"
        )
    if not autoscaling and v2_env:
        errs.append(f"{where}: RAY_enable_autoscaler_v2 set while enableInTreeAutoscaling is false")
    if autoscaling and (version == "v2" or v2_env):
        for tmpl_where, tmpl in [("head", head["template"])] + [
            (g["groupName"], g["template"]) for g in groups
        ]:
            policy = tmpl["spec"].get("restartPolicy", "Never")
            if policy != "Never":
                errs.append(
                    f"{where}: {tmpl_where} restartPolicy={policy}; autoscaler v2 needs Never or unset"
                )
    if annotations.get("ray.io/ft-enabled") and spec.get("gcsFaultToleranceOptions"):
        errs.append(f"{where}: ray.io/ft-enabled annotation and gcsFaultToleranceOptions are both set")
    if "RAY_REDIS_ADDRESS" in _env_names(head_containers[0]) and not spec.get("gcsFaultToleranceOptions"):
        errs.append(f"{where}: RAY_REDIS_ADDRESS set without gcsFaultToleranceOptions")
    return errs


def operator_errors(doc: dict[str, Any]) -> list[str]:
    """The KubeRay operator's own checks for a RayCluster, RayJob or RayService manifest."""
    kind, meta, spec = doc["kind"], doc["metadata"], doc["spec"]
    name, annotations = meta["name"], meta.get("annotations", {})
    errs: list[str] = []
    if len(name) > MAX_NAME[kind]:
        errs.append(f"{kind} name {name!r} is longer than {MAX_NAME[kind]} characters")
    if not DNS1035.match(name):
        errs.append(f"{kind} name {name!r} is not a DNS-1035 label")
    if kind == "RayCluster":
        errs += cluster_spec_errors(spec, annotations, kind)
    elif kind == "RayService":
        errs += cluster_spec_errors(spec["rayClusterConfig"], annotations, "RayService.rayClusterConfig")
    elif kind == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errs.append("RayJob: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errs.append("RayJob: suspend needs shutdownAfterJobFinishes: true")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errs.append("RayJob: one of rayClusterSpec or clusterSelector must be set")
        for key in ("activeDeadlineSeconds",):
            if key in spec and spec[key] <= 0:
                errs.append(f"RayJob: {key} must be positive")
        if "runtimeEnvYAML" in spec:
            try:
                env = yaml.safe_load(spec["runtimeEnvYAML"])
            except yaml.YAMLError as e:
                errs.append(f"RayJob: runtimeEnvYAML is not YAML: {e}")
            else:
                if not isinstance(env, dict):
                    errs.append(f"RayJob: runtimeEnvYAML must be a mapping, got {type(env).__name__}")
        if spec.get("rayClusterSpec"):
            errs += cluster_spec_errors(spec["rayClusterSpec"], annotations, "RayJob.rayClusterSpec")
    return errs


def load_docs(path: Path) -> list[dict[str, Any]]:
    """All YAML documents of a manifest file (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]
