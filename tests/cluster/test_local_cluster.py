"""A real Ray head (``ray start --head``) runs what the KubeRay manifests run, the way KubeRay runs it.

- ``ray job submit --working-dir . -- python jobs/pretrain.py ...`` with the flags of
  cluster/rayjob-pretrain.yaml on a tiny config; the job succeeds, its checkpoint exists, and the
  dashboard's REST API (``/api/jobs/``) reports it;
- ``serve deploy`` of cluster/rayservice.yaml's serveConfigV2 (a tiny model dir, CPU); the OpenAI client
  gets answers, ``/api/serve/applications/`` shows the app, and the metrics export port serves every
  ``ray_llmray_*`` series the Grafana dashboard (cluster/monitoring/) queries.

One head per module (start-up and shutdown cost seconds on two cores); the head is isolated from any
other Ray on the machine (cluster_helpers.LocalRayHead).
"""

from __future__ import annotations

import json
import re
import shlex
import uuid
from pathlib import Path

import pytest
import yaml
from cluster_helpers import (
    BIN,
    REPO,
    LocalRayHead,
    free_port,
    http_json,
    http_text,
    local_serve_config,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

DASHBOARD_JSON = REPO / "cluster" / "monitoring" / "grafana-dashboard-llmray.json"


@pytest.fixture(scope="module")
def head():
    with LocalRayHead(num_cpus=8) as h:
        yield h


def manifest_entrypoint(name: str) -> list[str]:
    (doc,) = [d for d in yaml.safe_load_all((REPO / "cluster" / name).read_text()) if d]
    return shlex.split(doc["spec"]["entrypoint"])


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


def test_pretrain_job_submit(head, tmp_path):
    assert (REPO / "jobs" / "pretrain.py").exists(), (
        "jobs/pretrain.py (the pretraining entry script) is missing"
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    )
    out = tmp_path / "run"
    argv = with_flags(
        manifest_entrypoint("rayjob-pretrain.yaml"),
        drop={"--use-gpu"},
        data=str(corpus), out=str(out), storage_path=str(tmp_path / "ray_results"), preset="tiny",
        tokenizer="char", max_steps="4", checkpoint_every="2", num_workers="1", cpus_per_worker="1",
    )  # fmt: skip
    assert argv[:2] == ["python", "jobs/pretrain.py"]
    submission_id = f"llmray-pretrain-{uuid.uuid4().hex[:8]}"
    (job_doc,) = [d for d in yaml.safe_load_all((REPO / "cluster" / "rayjob-pretrain.yaml").read_text()) if d]
    runtime_env = yaml.safe_load(job_doc["spec"]["runtimeEnvYAML"])  # the RayJob's env vars ...
    runtime_env.pop("working_dir")  # ... with this checkout as the working dir instead of the image's
    runtime_env["excludes"] = [".git", ".venv", ".gpu", "bench/results", "runs", "outputs"]
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
        "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *argv,
    ]  # fmt: skip
    proc = head.run_cli(cmd, timeout=120)
    assert proc.returncode == 0 and submission_id in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    # Poll the job through the dashboard's REST API (what `ray job status` and KubeRay's RayJob use).
    def finished() -> dict | None:
        job = http_json(f"{head.dashboard_url}/api/jobs/{submission_id}")
        return job if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

    job = wait_for(finished, 300, interval=2, what=f"job {submission_id} to finish")
    job_logs = http_json(f"{head.dashboard_url}/api/jobs/{submission_id}/logs")["logs"]
    assert job["status"] == "SUCCEEDED", f"{job['status']}: {job.get('message')}\n{job_logs[-4000:]}"
    assert job["entrypoint"] == shlex.join(argv)
    listed = {j["submission_id"]: j["status"] for j in http_json(f"{head.dashboard_url}/api/jobs/")}
    assert listed[submission_id] == "SUCCEEDED"
    assert str(out) in job_logs, "jobs/pretrain.py should print where its results went"

    # The Train run behind the job, as the dashboard's Train tab shows it.
    runs = http_json(f"{head.dashboard_url}/api/train/v2/runs/v1")["train_runs"]
    (run,) = [r for r in runs if r["job_id"] == job["job_id"]]
    assert run["name"] == "pretrain" and run["status"] == "FINISHED", {k: run[k] for k in ("name", "status")}

    # The Hugging Face model in --out, Ray Train's checkpoints in --storage-path.
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and (out / "model.safetensors").stat().st_size > 0
    assert (out / "metrics.jsonl").read_text().count("\n") >= 4
    checkpoints = sorted((tmp_path / "ray_results").rglob("checkpoint_*"))
    assert checkpoints, f"no Ray Train checkpoint under {tmp_path / 'ray_results'}"


def _serve_config(tiny_model_dir: Path, tmp_path: Path, port: int) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((REPO / "cluster" / "rayservice.yaml").read_text()) if d]
    config = local_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]), tiny_model_dir, tmp_path)
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["proxy_location"] = "HeadOnly"
    (app,) = config["applications"]
    # The manifest's application on one CPU machine: no GPU, one small replica each, a small cache.
    app["args"].update(
        use_gpu=False, num_cpus=0.25, ingress_replicas=1, ingress_num_cpus=0.1, min_replicas=1, max_replicas=1,
        api_key="test-key", engine_kwargs={"max_num_seqs": 8, "max_model_len": 256, "num_kv_blocks": 64},
    )  # fmt: skip
    return config


def dashboard_metric_names() -> set[str]:
    """Every ``ray_llmray_*`` / ``ray_serve_*`` metric the Grafana dashboard queries."""
    dash = json.loads(DASHBOARD_JSON.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\b(ray_(?:llmray|serve)_[a-z0-9_]+)\{", e)}


def test_serve_deploy_openai_metrics_dashboard(head, tiny_model_dir, tmp_path):
    from openai import AuthenticationError, OpenAI

    port = free_port()
    config = _serve_config(tiny_model_dir, tmp_path, port)
    (app,) = config["applications"]
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    proc = head.run_cli(
        [str(BIN / "serve"), "deploy", str(cfg_file), "--address", head.dashboard_url], timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def app_status():
        apps = http_json(f"{head.dashboard_url}/api/serve/applications/")["applications"]
        status = apps.get(app["name"], {}).get("status")
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise AssertionError(f"application {app['name']} is {status}: {apps[app['name']]}")
        return apps[app["name"]] if status == "RUNNING" else None

    details = wait_for(app_status, 180, what="the Serve application to be RUNNING")
    assert details["route_prefix"] == "/"
    deployments = details["deployments"]
    assert {name: d["status"] for name, d in deployments.items()} == {
        "OpenAIIngress": "HEALTHY",
        "LLMServer": "HEALTHY",
    }
    assert details["deployed_app_config"]["import_path"] == "llmray.serve.app:build_app"

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="test-key", max_retries=0, timeout=60)
    name = app["args"]["served_model_name"]
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

    # Ray's metrics agent exports the replicas' ray.serve.metrics with the `ray_` prefix.
    wanted = dashboard_metric_names()
    assert {"ray_llmray_time_to_first_token_seconds_bucket", "ray_llmray_kv_cache_usage_perc"} <= wanted

    def scraped() -> str | None:
        text = http_text(f"http://127.0.0.1:{head.metrics_port}/metrics")
        names = set(re.findall(r"^(ray_(?:llmray|serve)_[a-z0-9_]+)\{", text, flags=re.M))
        # metrics are exported periodically: wait until all three requests' TTFTs are in the export too
        counts = re.findall(r"^ray_llmray_time_to_first_token_seconds_count\{[^}]*\} (\S+)", text, flags=re.M)
        return text if wanted <= names and sum(map(float, counts)) >= 3 else None

    try:
        text = wait_for(scraped, 60, what=f"the series {sorted(wanted)} on the metrics export port")
    except TimeoutError:
        text = http_text(f"http://127.0.0.1:{head.metrics_port}/metrics")
        have = set(re.findall(r"^(ray_llmray_[a-z0-9_]+)", text, flags=re.M))
        raise AssertionError(
            f"missing {sorted(wanted - have)}; ray_llmray_* series present: {sorted(have)}"
        ) from None
    tokens = [
        float(v)
        for v in re.findall(
            rf'^ray_llmray_generation_tokens_total\{{[^}}]*model_name="{name}"[^}}]*\}} (\S+)',
            text,
            flags=re.M,
        )
    ]
    assert tokens and sum(tokens) >= completion.usage.completion_tokens + again.usage.completion_tokens
    ttft_count = re.findall(r"^ray_llmray_time_to_first_token_seconds_count\{[^}]*\} (\S+)", text, flags=re.M)
    assert sum(map(float, ttft_count)) >= 3

    proc = head.run_cli([str(BIN / "serve"), "shutdown", "-y", "--address", head.dashboard_url], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
