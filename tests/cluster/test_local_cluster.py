"""A real local Ray cluster (``ray start --head`` + Ray's autoscaler v2 with fake GPU nodes) runs what the
KubeRay manifests run, the way KubeRay runs it. One head for the whole module (each start and stop costs
seconds on two cores), isolated from any other Ray on the machine (cluster_helpers, autoscaling_cluster).

- ``llmray demo --quick`` submitted with ``ray job submit --working-dir .`` and cluster/rayjob-pretrain.yaml's
  runtime env: the whole pipeline on a cluster (a BPE tokenizer and pretraining on Ray Train, chat data and
  a LoRA fine-tune on Ray Train, base and adapter on Ray Serve, both asked through the ``openai`` client).
  The job succeeds and the dashboard's REST API reports it and its two Train runs; the answers came back
  through HTTP, the adapter lowers the validation loss, every artifact loads in llmray and in
  transformers/peft. This one run is both the demo's CI test and the job-submission test;
- ``python jobs/pretrain.py`` with the RayJob's exact flags (paths made local) gets through its flags,
  config and pre-flight checks and stops at ``--use-gpu`` with one clear error (no GPUs here), before Ray;
- ``serve deploy`` of cluster/rayservice.yaml's serveConfigV2 (a tiny model dir, ``use_gpu`` as in the
  manifest): the autoscaler adds a GPU node for the first LLMServer replica; the OpenAI client gets answers,
  ``/api/serve/applications/`` shows the app, every node's metrics export port serves every ``ray_llmray_*``
  series the Grafana dashboard (cluster/monitoring/) queries; under load Serve adds a replica and the
  autoscaler a second GPU node, and when the load stops both go away again.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from _support.load import streaming_load
from autoscaling_cluster import (
    IsolatedAutoscalingCluster,
    gpu_nodes,
    llm_replicas,
    scrape_every_node,
    worker_types_from_manifest,
)
from cluster_helpers import (
    BIN,
    REPO,
    LocalRayHead,
    free_port,
    http_json,
    local_serve_config,
    ray_env,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

DASHBOARD_JSON = REPO / "cluster" / "monitoring" / "grafana-dashboard-llmray.json"
KEY = "test-key"
DEMO_TIMEOUT_S = 840  # `llmray demo --quick` takes ~2 min on two idle cores, 8 under a full `make test`
DEMO_STEPS = 20


@pytest.fixture(scope="module")
def cluster():
    head_resources, types = worker_types_from_manifest()
    assert head_resources["GPU"] == 0 and types["gpu-workers"]["resources"]["GPU"] == 1
    assert types["gpu-workers"]["min_workers"] == 0 and types["gpu-workers"]["max_workers"] == 2
    # 8 logical CPUs instead of the head pod's 4: the demo's Train workers, Ray Data and Serve replicas run
    # on the head here (no CPU worker group), asking fractions of a CPU
    head_resources["CPU"] = max(head_resources["CPU"], 8)
    c = IsolatedAutoscalingCluster(head_resources, types, idle_timeout_minutes=0.1)
    try:
        c.start()
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def head(cluster) -> LocalRayHead:
    return cluster.head


def manifest_doc(name: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((REPO / "cluster" / name).read_text()) if d]
    return doc


def manifest_entrypoint(name: str) -> list[str]:
    return shlex.split(manifest_doc(name)["spec"]["entrypoint"])


def with_flags(argv: list[str], drop: set[str], **values: str) -> list[str]:
    """``argv`` with the flags in ``drop`` removed and ``--key value`` pairs set (``_`` -> ``-``)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        key = arg[2:].replace("-", "_") if arg.startswith("--") else None
        if key in values or arg in drop:
            i += 2 if takes_value else 1
            continue
        out.append(arg)
        i += 1
    for key, value in values.items():
        out += [f"--{key.replace('_', '-')}", value]
    return out


@pytest.fixture(scope="module")
def demo_job(head, tmp_path_factory) -> dict:
    """``llmray demo --quick`` as a Ray job on the head, run to its end: the job, its logs, the summary."""
    out = tmp_path_factory.mktemp("demo")
    # --quick with half its pretraining steps: the job's time is Ray's set-up (Ray Data, two Ray Train runs,
    # Serve); 20 steps still take the loss well below ln(vocab) for the adapter to improve on
    argv = ["python", "-m", "llmray.cli", "demo", "--quick", "--max-steps", str(DEMO_STEPS), "--out", str(out),
            "--port", str(free_port())]  # fmt: skip
    submission_id = f"llmray-demo-{uuid.uuid4().hex[:8]}"
    # the RayJob's runtime env (its env vars: Ray Train V2, the dashboard's Train tab), this checkout as
    # the working dir instead of the image's
    runtime_env = yaml.safe_load(manifest_doc("rayjob-pretrain.yaml")["spec"]["runtimeEnvYAML"])
    runtime_env.pop("working_dir")
    # the job imports llmray only: the tests, benchmarks, docs and byte-code stay here (less to pack and unpack)
    runtime_env["excludes"] = [".git", ".venv", ".gpu", ".data", ".whl", "bench", "tests", "docs", "runs", "outputs",
                               "__pycache__"]  # fmt: skip
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
        "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *argv,
    ]  # fmt: skip
    proc = head.run_cli(cmd, timeout=300)  # packs and uploads this checkout: slow on a busy machine
    assert proc.returncode == 0 and submission_id in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    # Poll the job through the dashboard's REST API (what `ray job status` and KubeRay's RayJob use).
    def finished() -> dict | None:
        job = http_json(f"{head.dashboard_url}/api/jobs/{submission_id}")
        return job if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

    job = wait_for(finished, DEMO_TIMEOUT_S, interval=2, what=f"job {submission_id} (the demo) to finish")
    logs = http_json(f"{head.dashboard_url}/api/jobs/{submission_id}/logs")["logs"]
    assert job["status"] == "SUCCEEDED", f"{job['status']}: {job.get('message')}\n{logs[-6000:]}"
    summary = json.loads((out / "demo_summary.json").read_text())
    return {"job": job, "logs": logs, "argv": argv, "out": out, "summary": summary}


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_demo_job_succeeds_and_the_dashboard_reports_it(head, demo_job):
    job, logs, out = demo_job["job"], demo_job["logs"], demo_job["out"]
    assert job["entrypoint"] == shlex.join(demo_job["argv"])
    listed = {j["submission_id"]: j["status"] for j in http_json(f"{head.dashboard_url}/api/jobs/")}
    assert listed[job["submission_id"]] == "SUCCEEDED"
    for stage in ("[1/5] corpus", "[2/5] pretrain", "[3/5] fine-tune", "[4/5] serve", "[5/5] ask"):
        assert stage in logs  # a progress line per stage, in the job's logs
    assert str(out / "demo_summary.json") in logs, "the demo prints where its results went"
    # the demo's console: stages, times and losses; no worker step lines, Ray Train prefixes, progress bars or MFU
    noise = re.compile(
        r"step \d+/\d+ \||\((RayTrainWorker|TrainController)\b|Progress bars|Running Dataset|\bmfu\b"
    )
    noisy = [ln for ln in logs.splitlines() if noise.search(ln)]
    assert not noisy, noisy[:10]

    # The job's Train runs, as the dashboard's Train tab shows them.
    runs = http_json(f"{head.dashboard_url}/api/train/v2/runs/v1")["train_runs"]
    mine = {r["name"]: r["status"] for r in runs if r["job_id"] == job["job_id"]}
    assert mine == {"pretrain": "FINISHED", "finetune": "FINISHED"}, mine

    # The Hugging Face model, Ray Train's checkpoints of the pretraining run, the adapter.
    base = Path(demo_job["summary"]["artifacts"]["base_model"])
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "qwen3" and (base / "model.safetensors").stat().st_size > 0
    assert (base / "metrics.jsonl").read_text().count("\n") >= 4
    assert sorted((base / "ray_results").rglob("checkpoint_*")), f"no Ray Train checkpoint under {base}"


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_demo_answers_came_back_through_http_from_base_and_adapter(demo_job):
    summary = demo_job["summary"]
    assert summary["served_models"] == ["demo-base", "demo-docstrings"]
    assert set(summary["answers"]) == {"demo-base", "demo-docstrings"}
    assert all(isinstance(a, str) and a for a in summary["answers"].values())
    assert all(n > 0 for n in summary["completion_tokens"].values())


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_demo_adapter_lowered_the_validation_loss(demo_job):
    summary = demo_job["summary"]
    ft = summary["finetune"]
    assert ft["val_loss_adapter"] < ft["val_loss_base"]
    pre = summary["pretrain"]
    assert pre["steps"] == DEMO_STEPS and pre["val_loss"] < 7.0  # ln(1024) = 6.93


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_demo_artifacts_exist_and_load(demo_job):
    summary = demo_job["summary"]
    for path in summary["artifacts"].values():
        assert Path(path).exists(), path
    import peft
    from transformers import AutoModelForCausalLM

    from llmray.lora.adapter import load_adapter
    from llmray.model.checkpoint import load_model
    from llmray.model.tokenizer import Tokenizer

    base_dir, adapter_dir = summary["artifacts"]["base_model"], summary["artifacts"]["adapter"]
    ours = load_model(base_dir, kernels="torch").eval()
    hf = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([Tokenizer.load(base_dir).encode("def dedent(text):")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
        tuned = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
        assert not torch.allclose(tuned(ids).logits, ours(ids), atol=1e-4)  # the adapter changes the model
    assert load_adapter("x", adapter_dir, ours.config, 64).rank == 8
    metrics = [
        json.loads(line) for line in Path(summary["artifacts"]["finetune_metrics"]).read_text().splitlines()
    ]
    assert metrics and all("loss" in m or "val_loss" in m for m in metrics)


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="with 4 GPUs the manifest's command would train")
def test_pretrain_job_script_takes_the_rayjob_entrypoint(tmp_path):
    """The RayJob's command as written (data, out and storage paths made local), run the way the job runs
    it (``python jobs/pretrain.py`` in the working dir): its flags parse, the config validates, the
    pre-flight checks pass up to ``--use-gpu`` (4 workers, no GPUs here): one clear error, exit 2, before
    Ray starts or anything is written. The training itself is the demo job's pretraining stage above."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 50)
    out, storage = tmp_path / "run", tmp_path / "ray_results"
    argv = with_flags(
        manifest_entrypoint("rayjob-pretrain.yaml"), drop=set(),
        data=str(corpus / "*.txt"), out=str(out), storage_path=str(storage),
    )  # fmt: skip
    assert argv[:2] == ["python", "jobs/pretrain.py"] and "--use-gpu" in argv
    proc = subprocess.run(
        [sys.executable, *argv[1:]], cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: --use-gpu needs 4 GPU(s)" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists() and not storage.exists()


def _serve_config(tiny_model_dir: Path, tmp_path: Path, port: int) -> dict:
    """cluster/rayservice.yaml's serve config on this machine: a tiny model, small engines, fast autoscaling."""
    (doc,) = [d for d in yaml.safe_load_all((REPO / "cluster" / "rayservice.yaml").read_text()) if d]
    config = local_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]), tiny_model_dir, tmp_path)
    config.update(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    (app,) = config["applications"]
    assert app["args"]["use_gpu"] is True  # every LLMServer replica needs a GPU node
    app["args"].update(
        api_key=KEY, min_replicas=1, max_replicas=2, target_ongoing_requests=1, max_ongoing_requests=4,
        ingress_replicas=1, ingress_num_cpus=0.1,
        engine_kwargs={"max_num_seqs": 4, "max_model_len": 512, "num_kv_blocks": 128},
        autoscaling_overrides={"upscale_delay_s": 0.5, "downscale_delay_s": 3.0, "metrics_interval_s": 0.5, "look_back_period_s": 1.0},
    )  # fmt: skip
    return config


def serve_deploy(head: LocalRayHead, cfg_file: Path) -> None:
    """``serve deploy`` through the dashboard; once more when the dashboard dropped the request (its Serve
    module restarts when it misses a health check on a busy machine). The config is declarative: the same
    PUT again is the same deploy."""
    cmd = [str(BIN / "serve"), "deploy", str(cfg_file), "--address", head.dashboard_url]
    for attempt in range(2):
        proc = head.run_cli(cmd, timeout=180)
        dropped = "RemoteDisconnected" in proc.stderr or "ActorDiedError" in proc.stderr
        if proc.returncode == 0 or not dropped or attempt == 1:
            break
        print(
            f"serve deploy: the dashboard dropped the request, once more:\n{proc.stderr[-1500:]}", flush=True
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dashboard_metric_names() -> set[str]:
    """Every ``ray_llmray_*`` / ``ray_serve_*`` metric the Grafana dashboard queries."""
    dash = json.loads(DASHBOARD_JSON.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\b(ray_(?:llmray|serve)_[a-z0-9_]+)\{", e)}


def _ask_through_openai(port: int, name: str) -> int:
    """The OpenAI client against the deployed app; returns the completion tokens of the two completions."""
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [name]
    # > 2 KV blocks of 16 tokens, so the repeated request hits the prefix cache (a metric on the dashboard).
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    completion = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert 1 <= completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 16
    again = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
    assert again.choices[0].text == completion.choices[0].text  # greedy: same answer
    stream = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=6, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    return completion.usage.completion_tokens + again.usage.completion_tokens


def _check_metrics(head: LocalRayHead, name: str, completion_tokens: int) -> None:
    """Ray's metrics agents export the replicas' ray.serve.metrics (``ray_`` prefix) on every node."""
    wanted = dashboard_metric_names()
    assert {"ray_llmray_time_to_first_token_seconds_bucket", "ray_llmray_kv_cache_usage_perc"} <= wanted
    ttft = r"^ray_llmray_time_to_first_token_seconds_count\{[^}]*\} (\S+)"

    def scraped() -> str | None:
        text = scrape_every_node(head)
        names = set(re.findall(r"^(ray_(?:llmray|serve)_[a-z0-9_]+)\{", text, flags=re.M))
        # metrics are exported periodically: wait until all three requests' TTFTs are in the export too
        return text if wanted <= names and sum(map(float, re.findall(ttft, text, flags=re.M))) >= 3 else None

    try:
        text = wait_for(scraped, 120, what=f"the series {sorted(wanted)} on the metrics export ports")
    except TimeoutError:
        have = set(re.findall(r"^(ray_(?:llmray|serve)_[a-z0-9_]+)", scrape_every_node(head), flags=re.M))
        raise AssertionError(f"missing {sorted(wanted - have)}; present: {sorted(have)}") from None
    tokens = rf'^ray_llmray_generation_tokens_total\{{[^}}]*model_name="{name}"[^}}]*\}} (\S+)'
    assert sum(map(float, re.findall(tokens, text, flags=re.M))) >= completion_tokens


@pytest.mark.timeout(900)  # ~80 s on two cores; its waits add up to more on a machine under load
def test_rayservice_deploys_answers_exports_metrics_and_autoscales(
    cluster, tiny_model_dir, tmp_path, record_property
):
    head = cluster.head
    t0, timeline = time.monotonic(), {}

    def mark(event: str) -> None:
        timeline[event] = round(time.monotonic() - t0, 1)
        print(f"[autoscaling] +{timeline[event]:6.1f}s {event}", flush=True)

    assert gpu_nodes(head) == 0, "the GPU group starts at minReplicas=0"
    port = free_port()
    config = _serve_config(tiny_model_dir, tmp_path, port)
    (app,) = config["applications"]
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    serve_deploy(head, cfg_file)

    def app_status():
        apps = http_json(f"{head.dashboard_url}/api/serve/applications/")["applications"]
        status = apps.get(app["name"], {}).get("status")
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise AssertionError(f"application {app['name']} is {status}: {apps[app['name']]}")
        return apps[app["name"]] if status == "RUNNING" else None

    # The first LLMServer replica needs {"GPU": 1}: the autoscaler launches the first GPU node for it.
    try:
        details = wait_for(app_status, 240, what="the Serve application to be RUNNING (1 GPU node)")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{cluster.autoscaler_log()}") from None
    assert details["route_prefix"] == "/"
    assert details["deployed_app_config"]["import_path"] == "llmray.serve.app:build_app"
    statuses = {name: d["status"] for name, d in details["deployments"].items()}
    assert statuses == {"OpenAIIngress": "HEALTHY", "LLMServer": "HEALTHY"}
    assert gpu_nodes(head) == 1 and llm_replicas(head, app["name"]) == 1
    mark("1 GPU node, 1 LLMServer replica (scaled from 0 nodes)")

    name = app["args"]["served_model_name"]
    _check_metrics(head, name, _ask_through_openai(port, name))
    mark("answers through the openai client; the dashboard's series on the metrics ports")

    bodies = [{"model": name, "prompt": f"load {i}", "max_tokens": 200, "stream": True} for i in range(2)]
    with streaming_load(f"http://127.0.0.1:{port}/v1/completions", bodies, KEY) as statuses_seen:
        mark("load started (2 streaming clients: 2 ongoing requests, target 1 per replica)")
        wait_for(lambda: gpu_nodes(head) == 2, 180, what="the autoscaler to add a second GPU node")
        mark("2 GPU nodes")
        wait_for(lambda: llm_replicas(head, app["name"]) == 2, 180, what="a second LLMServer replica")
        mark("2 LLMServer replicas")
    assert statuses_seen and set(statuses_seen) == {200}, sorted(set(statuses_seen))
    mark(f"load stopped ({len(statuses_seen)} requests, all 200)")

    # Idle: Serve drops back to min_replicas, then the autoscaler removes the idle GPU node.
    wait_for(lambda: llm_replicas(head, app["name"]) == 1, 120, what="LLMServer back to 1 replica")
    mark("1 LLMServer replica")
    wait_for(lambda: gpu_nodes(head) == 1, 120, what="the idle GPU node to be removed")
    mark("1 GPU node (idle node removed)")
    assert llm_replicas(head, app["name"]) == 1
    record_property("autoscaling_timeline_s", json.dumps(timeline))
