"""``build_app(args) -> serve.Application``: the llmray OpenAI application on Ray Serve.

The one thing ``serve run llmray.serve.app:build_app model=/models/x`` and a KubeRay ``serveConfigV2``
(``import_path: llmray.serve.app:build_app`` + ``args:``) name. ``ingress_mode``:

- ``"replica"`` (default): one deployment, ``LLMServer`` (one engine per replica; ``num_gpus: 1`` on GPU
  clusters, a fraction of a CPU locally), serving the OpenAI FastAPI app itself: a stream's chunks go
  from the engine core's pipe to the HTTP socket without a Ray message (with ``RAY_SERVE_ENABLE_HA_PROXY=1``,
  which ``llmray serve`` sets when HAProxy is usable, HTTP reaches the replica without Serve's Python proxy
  either). The replica holds up to ``max_ongoing_requests + max_queued_requests`` requests (the engine
  queues what its batch cannot take) and answers 429 beyond;
- ``"separate"``: ``OpenAIIngress`` (FastAPI, CPU, ``ingress_replicas`` replicas) in front of ``LLMServer``
  (``max_ongoing_requests`` raised to the engine's batch, Serve's default is only 5, plus
  ``max_queued_requests``, beyond which the ingress answers 429); it keeps Serve's model-multiplexing
  routing of adapter requests to replicas holding the adapter, at two Ray hops per stream chunk.

Both autoscale ``LLMServer`` between ``min_replicas`` and ``max_replicas`` on ongoing requests
(docs/serving.md has the measurements behind the default).

A RayService names it like this (``args`` are the fields of ``ServeArgs``)::

    serveConfigV2: |
      applications:
        - name: llmray
          import_path: llmray.serve.app:build_app
          route_prefix: /
          args: {model: /models/qwen3-0.6b, use_gpu: true, min_replicas: 1, max_replicas: 4}

LoRA: ``loras`` ({name: dir}, preloaded by every replica) and ``lora_root`` (adapters under it are served
by their directory names, loaded on first use, and ``/v1/load_lora_adapter`` may add more from under it)
turn adapter serving on (``enable_lora`` for the engine). All replicas share the name -> directory
registry ``<lora_root>/.llmray-adapters.json`` (``llmray/serve/lora_registry.py``); ``build_app`` draws
the token that lets the replicas of one deployment seed it with the startup adapters once.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve

from llmray.serve.backends import HandleBackend, ReplicaBackend
from llmray.serve.ingress import IngressConfig, build_openai_app
from llmray.serve.limits import MAX_BODY_BYTES
from llmray.serve.lora_registry import scan_root
from llmray.serve.protocol import check_adapter_name
from llmray.serve.server import LLMServer


class ServeArgs(BaseModel):
    """Arguments of ``build_app`` (also the YAML ``args:`` of a RayService)."""

    model_config = ConfigDict(extra="forbid")

    model: str  # model directory (Hugging Face Qwen3 checkpoint)
    served_model_name: str | None = None  # the `model` clients send; default: the directory's name
    loras: dict[str, str] = Field(default_factory=dict)  # adapter name -> PEFT directory
    lora_root: str | None = None  # every sub-directory holding adapter_config.json is an adapter
    api_key: str | None = None  # default: $LLMRAY_API_KEY; none = open
    engine: Literal["llmray"] = "llmray"  # kept for older configs; stand-ins come from engine_factory
    engine_factory: str | None = None  # "module:callable" building a stand-in engine (tests); None = llmray
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # EngineConfig fields
    use_gpu: bool | None = None  # None: True when the Ray cluster (or this machine) has a GPU
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)  # default: half the engine batch
    max_ongoing_requests: int | None = Field(None, ge=1)  # default: 2 x the engine's max_num_seqs
    max_queued_requests: int | None = Field(None, ge=-1)  # default: 2 x max_ongoing_requests; -1 = no limit
    num_cpus: float = Field(0.5, gt=0)  # per LLMServer replica
    # "replica": the OpenAI app runs in each LLMServer replica (no Ray message per stream chunk);
    # "separate": an OpenAIIngress deployment in front (two Ray hops per chunk); docs/serving.md measures both
    ingress_mode: Literal["replica", "separate"] = "replica"
    ingress_replicas: int = Field(2, ge=1)  # ingress_mode="separate" only
    access_log: bool = False  # Serve's access-log line per request
    ingress_num_cpus: float = Field(0.1, gt=0)
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024)
    retry_after_s: int = Field(1, ge=0)
    autoscaling_overrides: dict[str, Any] = Field(default_factory=dict)  # e.g. upscale_delay_s (tests)
    health_check_period_s: float = Field(10.0, gt=0)
    # on shutdown or downscale, replicas finish in-flight requests for up to this long (Serve's default,
    # 20 s, cuts any generation longer than that); the ingress gets the same, as streams pass through it
    graceful_shutdown_timeout_s: float = Field(120.0, gt=0)
    # after the first token, each request's stream yields at most once per interval (0 = every step);
    # Ray Serve LLM batches the same way (50 ms). Fewer Ray messages per token: see bench/serve.py
    stream_interval_ms: float = Field(20.0, ge=0)
    # Ray streaming messages per second per LLMServer replica: with N streams the interval becomes
    # max(stream_interval_ms, N / this), so Serve's per-message cost stays bounded at high concurrency
    # (0 = the fixed interval only); docs/serving.md has the measurement
    stream_messages_per_s: float = Field(4000.0, ge=0)

    @model_validator(mode="after")
    def _replicas(self) -> ServeArgs:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}")
        if not Path(self.model).is_dir() and self.engine_factory is None:
            raise ValueError(f"model directory {self.model!r} does not exist")
        if self.engine_factory is None:
            check_max_model_len(self.model, self.engine_kwargs.get("max_model_len"))
        return self

    def lora_dirs(self) -> dict[str, str]:
        loras = dict(self.loras)
        if self.lora_root:
            root = Path(self.lora_root)
            if not root.is_dir():
                raise ValueError(f"lora_root {self.lora_root!r} is not a directory")
            for name, path in scan_root(root).items():
                loras.setdefault(name, path)
        for name in loras:
            check_adapter_name(name)  # names are client-visible model ids: never a path
        return loras


def check_max_model_len(model: str, max_model_len: Any, flag: str = "max_model_len") -> None:
    """ValueError when ``max_model_len`` exceeds the positions the model was built for (its config.json's
    ``max_position_embeddings``): refused before Ray starts, not by each replica's engine."""
    if max_model_len is None:
        return
    try:
        positions = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable config.json: the engine's loader names the problem
    if int(max_model_len) > int(positions):
        raise ValueError(
            f"{flag} {max_model_len} is longer than the model's {positions} positions "
            f"(max_position_embeddings in {Path(model) / 'config.json'}); use at most {positions}"
        )


def _cluster_has_gpu() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


class OpenAIIngress:
    """The FastAPI ingress deployment; the ASGI app is built per replica around the LLMServer handle."""

    def __init__(self, llm_server: Any, config: dict[str, Any]) -> None:
        self.backend = HandleBackend(llm_server)
        self.config = IngressConfig(**config)

    def __serve_build_asgi_app__(self) -> Any:
        return build_openai_app(self.backend, self.config)


class LLMServerIngress(LLMServer):
    """``LLMServer`` serving the OpenAI app itself (``ingress_mode="replica"``): the ingress calls it in-process."""

    def __init__(self, *args: Any, ingress_config: dict[str, Any], max_requests: int | None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ingress_config = IngressConfig(**ingress_config)
        self._max_requests = max_requests

    def __serve_build_asgi_app__(self) -> Any:
        return build_openai_app(ReplicaBackend(self, self._max_requests), self._ingress_config)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The llmray OpenAI application (see ``ServeArgs`` for the keys of ``args``)."""
    try:
        a = ServeArgs.model_validate(args)
    except ValidationError as e:
        raise ValueError(f"invalid llmray serve arguments: {e}") from None
    loras = a.lora_dirs()  # validates lora_root and the adapter names
    name = a.served_model_name or Path(a.model).resolve().name
    api_key = a.api_key if a.api_key is not None else os.environ.get("LLMRAY_API_KEY") or None
    use_gpu = _cluster_has_gpu() if a.use_gpu is None else a.use_gpu

    batch = int(a.engine_kwargs.get("max_num_seqs", 256))
    # twice the engine batch: a finished request's slot is refilled from the engine's own queue at once,
    # not after a round trip through Serve's router (bench/serve.py, docs/serving.md)
    max_ongoing = a.max_ongoing_requests or 2 * batch
    max_queued = a.max_queued_requests if a.max_queued_requests is not None else 2 * max_ongoing
    autoscaling = {
        "min_replicas": a.min_replicas,
        "initial_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests or max(1.0, batch / 2),
        **a.autoscaling_overrides,
    }
    actor = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": a.num_cpus}
    ingress_config = {
        "served_model_name": name,
        "dynamic_loras": bool(loras or a.lora_root),
        "api_key": api_key,
        "max_body_bytes": a.max_body_bytes,
        "retry_after_s": a.retry_after_s,
        "max_model_len": a.engine_kwargs.get("max_model_len"),
    }
    server_kwargs = {
        "engine_factory": a.engine_factory,
        "engine_kwargs": a.engine_kwargs,
        "loras": a.loras,  # preloaded; the lora_root sub-directories are registered and loaded on first use
        "stream_interval_ms": a.stream_interval_ms,
        "stream_messages_per_s": a.stream_messages_per_s,
        "lora_root": a.lora_root,
        "lora_seed": uuid.uuid4().hex,  # one per deployment: its replicas seed the registry once
    }
    common = {
        # no Serve access-log line per request: at hundreds of requests/s it costs the replica's event loop
        # (llmray's own request logs carry the X-Request-Id); access_log=True brings it back
        "logging_config": {"enable_access_log": a.access_log},
        "ray_actor_options": actor,
        "autoscaling_config": autoscaling,
        "health_check_period_s": a.health_check_period_s,
        "health_check_timeout_s": max(30.0, a.health_check_period_s),
        "graceful_shutdown_timeout_s": a.graceful_shutdown_timeout_s,
    }
    if a.ingress_mode == "replica":
        # HTTP requests reach the replica as they come (Serve queues none in front of it): the replica
        # holds up to max_ongoing + max_queued of them (the engine queues what its batch cannot take)
        # and answers 429 beyond, as the separate ingress does when Serve's queue is full
        # (Serve's own cap sits above ours, so the requests past our limit reach the replica and get the 429)
        limit = None if max_queued < 0 else max_ongoing + max_queued
        cls = serve.ingress()(LLMServerIngress)
        serve_cap = 100_000 if limit is None else 2 * limit + 64
        deployment = serve.deployment(name="LLMServer")(cls).options(
            max_ongoing_requests=serve_cap, max_queued_requests=-1, **common
        )
        return deployment.bind(
            a.model, name, ingress_config=ingress_config, max_requests=limit, **server_kwargs
        )
    llm = serve.deployment(name="LLMServer")(LLMServer).options(
        max_ongoing_requests=max_ongoing, max_queued_requests=max_queued, **common
    )
    ingress_cls = serve.ingress()(OpenAIIngress)
    ingress = serve.deployment(name="OpenAIIngress")(ingress_cls).options(
        num_replicas=a.ingress_replicas,
        ray_actor_options={"num_cpus": a.ingress_num_cpus},
        graceful_shutdown_timeout_s=a.graceful_shutdown_timeout_s,
        max_ongoing_requests=max(1000, 4 * max_ongoing * a.max_replicas),
        logging_config=common["logging_config"],
    )
    return ingress.bind(llm.bind(a.model, name, **server_kwargs), ingress_config)
