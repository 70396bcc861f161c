"""The RayService's serveConfigV2 parses as Serve's own deploy schema and its import path builds the app.

Serve builds the application the same way on the cluster: ``import_attr(import_path)`` called with
``args`` through ``call_user_app_builder_with_args_if_necessary``, then ``build_app``. Only the model
path (and the adapter root) change here, to a tiny local checkpoint.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from cluster_helpers import local_serve_config, serve_configs
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]


SERVE_CONFIGS = serve_configs()


def _models_in(annotation: typing.Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model inside an annotation (through Optional/Union/List/Annotated), and whether listed."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, typing.List):  # noqa: UP006 - typing.List is what Serve's schema uses
        model, _ = _models_in(args[0]) if args else (None, False)
        return model, True
    for arg in args:
        model, listed = _models_in(arg)
        if model is not None:
            return model, listed
    return None, False


def unknown_fields(model: type[BaseModel], data: typing.Any, path: str = "") -> list[str]:
    """Keys of ``data`` that ``model`` (recursively) does not declare.

    Serve's schemas ignore unknown keys, so a misspelled ``autoscaling_confg`` would be dropped silently
    on the cluster; this is the strict mode for serve configs that the CRD check is for manifests.
    """
    if not isinstance(data, dict):
        return []
    fields = {f.alias or n: f for n, f in model.model_fields.items()}
    out = []
    for key, value in data.items():
        if key not in fields:
            out.append(f"{path}{key}")
            continue
        sub, listed = _models_in(fields[key].annotation)
        if sub is None:
            continue
        for i, item in enumerate(value if listed and isinstance(value, list) else [value]):
            out += unknown_fields(sub, item, f"{path}{key}{f'[{i}]' if listed else ''}.")
    return out


def test_a_rayservice_exists():
    assert [name for name, _ in SERVE_CONFIGS] == ["rayservice.yaml"]


@pytest.mark.parametrize("name,config", SERVE_CONFIGS, ids=[n for n, _ in SERVE_CONFIGS])
def test_serve_config_parses_with_serve_schema(name, config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    assert unknown_fields(ServeDeploySchema, config) == []
    (app,) = schema.applications
    assert app.import_path == "llmray.serve.app:build_app"
    assert app.route_prefix == "/"
    assert schema.http_options.port == 8000 and schema.http_options.host == "0.0.0.0"
    assert 1 <= app.args["min_replicas"] < app.args["max_replicas"]
    assert app.args["use_gpu"] is True, (
        "set use_gpu: an autoscaled-to-zero GPU group shows no GPUs at build time"
    )


def test_misspelled_serve_field_fails():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    config = dict(SERVE_CONFIGS[0][1])
    config["applications"] = [dict(config["applications"][0], import_paht="x:y")]
    ServeDeploySchema.model_validate(config)  # Serve itself ignores the typo ...
    assert unknown_fields(ServeDeploySchema, config) == ["applications[0].import_paht"]  # ... we do not
    config["applications"] = [
        dict(
            config["applications"][0],
            deployments=[{"name": "LLMServer", "autoscaling_config": {"max_replica": 2}}],
        )
    ]
    assert unknown_fields(ServeDeploySchema, config) == [
        "applications[0].import_paht",
        "applications[0].deployments[0].autoscaling_config.max_replica",
    ]
    config["http_options"] = {"prot": 8000}
    assert "http_options.prot" in unknown_fields(ServeDeploySchema, config)
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate({**config, "applications": "not a list"})


@pytest.mark.parametrize("name,config", SERVE_CONFIGS, ids=[n for n, _ in SERVE_CONFIGS])
def test_import_path_builds_the_application(name, config, tiny_model_dir, tmp_path):
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(local_serve_config(config, tiny_model_dir, tmp_path))
    (app,) = schema.applications
    application = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    built = build_app(application, name=app.name)
    deployments = {d.name: d for d in built.deployments}
    assert (
        set(deployments) == {"OpenAIIngress", "LLMServer"}
        and built.ingress_deployment_name == "OpenAIIngress"
    )
    llm = deployments["LLMServer"]
    assert llm.ray_actor_options["num_gpus"] == 1  # one GPU per engine replica: GPU pods autoscale
    auto = llm._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (app.args["min_replicas"], app.args["max_replicas"])
    assert auto.target_ongoing_requests == app.args["target_ongoing_requests"]
    assert llm._deployment_config.max_ongoing_requests == app.args["max_ongoing_requests"]
    assert deployments["OpenAIIngress"].num_replicas == app.args["ingress_replicas"]


def test_build_app_rejects_unknown_args(tiny_model_dir):
    from llmray.serve.app import build_app

    with pytest.raises(ValueError, match="num_gpu"):
        build_app({"model": str(tiny_model_dir), "num_gpu": 1})
