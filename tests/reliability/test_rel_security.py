"""Security: API keys on every /v1 route, body limits, bounded echoes, no unpickling, no path traversal.

In-process app (ingress + ``LLMServer`` over the mock engine); the loaders are called directly with files
that would run code if anything unpickled them (a marker file appears if it ever does).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from _support.local_backend import MOCK_ENGINE, LocalBackend
from fastapi.testclient import TestClient
from starlette.routing import Route

from llmray.serve.errors import MAX_ECHO_CHARS, MAX_MESSAGE_CHARS
from llmray.serve.ingress import IngressConfig, build_openai_app
from llmray.serve.protocol import check_adapter_name
from llmray.serve.server import LLMServer

MODEL = "mock-model"
KEY = "sk-rel-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def app():
    server = LLMServer(
        "unused",
        MODEL,
        engine_factory=MOCK_ENGINE,
        engine_kwargs={"token_delay_s": 0.0},
        enable_metrics=False,
    )
    return build_openai_app(LocalBackend(server), IngressConfig(MODEL, api_key=KEY, max_body_bytes=LIMIT))


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


def v1_routes(app) -> list[tuple[str, str]]:
    """Every (method, path) under /v1 the app serves, path parameters filled with a dummy value."""
    out = []
    for r in app.routes:
        if isinstance(r, Route) and r.path.startswith("/v1"):
            path = r.path
            for name in r.param_convertors:
                path = path.replace("{" + name + "}", "x").replace("{" + name + ":path}", "x")
            out += [(m, path) for m in sorted(r.methods or ()) if m != "HEAD"]
    return out


BAD_AUTH = [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
    {"X-API-Key": KEY},
]


def test_every_v1_route_needs_the_key(app, client):
    routes = v1_routes(app)
    assert {("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")} <= set(
        routes
    )
    body = {"model": MODEL, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path in routes:
        for headers in BAD_AUTH:
            r = client.request(method, path, headers=headers, json=body)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY not in r.text
        r = client.request(method, f"{path}?api_key={KEY}", json=body)  # keys in URLs are not accepted
        assert r.status_code == 401
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    r = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key


def test_oversize_bodies_are_413(client):
    big = json.dumps({"model": MODEL, "prompt": "x" * (2 * LIMIT)}).encode()
    r = client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "mock-model", "prompt": "'
        for _ in range(4 * LIMIT // 4096):
            yield b"x" * 4096
        yield b'"}'

    r = client.post("/v1/chat/completions", headers=AUTH, content=chunks())
    assert r.status_code == 413 and str(LIMIT) in r.json()["error"]["message"]
    # an unauthenticated giant body is refused before it is read
    r = client.post("/v1/completions", content=big)
    assert r.status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"model": "A" * 30_000, "prompt": "hi"},
        {"model": MODEL, "prompt": "hi", "temperature": "B" * 30_000},
        {"model": MODEL, "prompt": "hi", "stop": ["C" * 30_000]},
        {"model": MODEL, "messages": [{"role": "D" * 30_000, "content": "x"}]},
        {"model": MODEL, "prompt": "hi", "max_tokens": int("9" * 3000)},
        {"model": MODEL, "prompt": [[7] * 30_000]},
    ],
    ids=["model", "temperature", "stop", "role", "max_tokens", "token-prompt"],
)
def test_errors_echo_a_bounded_part_of_the_input(client, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = client.post(path, headers=AUTH, json=body)
    assert 400 <= r.status_code < 500
    msg = r.json()["error"]["message"]
    assert len(msg) <= MAX_MESSAGE_CHARS + 40, len(msg)
    for ch in "ABCD9":
        assert ch * (MAX_ECHO_CHARS + 1) not in msg  # never more than MAX_ECHO_CHARS of one value


# --- no unpickling ------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this writes ``marker``: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def _pickle_file(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    return path


def test_model_checkpoints_never_unpickle(tmp_path, tiny_model_dir):
    from llmray.model.checkpoint import load_model

    marker = tmp_path / "pwned"
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    _pickle_file(only_bin / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match="never unpickles"):
        load_model(only_bin)
    disguised = tmp_path / "disguised"  # a pickle renamed to model.safetensors
    disguised.mkdir()
    (disguised / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    _pickle_file(disguised / "model.safetensors", marker)
    with pytest.raises(Exception) as e:
        load_model(disguised)
    assert "header" in str(e.value).lower() or "safetensors" in str(e.value).lower(), e.value
    assert not marker.exists()


def test_training_checkpoints_never_unpickle(tmp_path, tiny_model):
    from llmray.train.loop import STATE_FILE, load_checkpoint

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / STATE_FILE).write_text(json.dumps({"trainer": {"step": 3}}))
    _pickle_file(ckpt / "model.safetensors", marker)
    with pytest.raises(Exception) as e:
        load_checkpoint(ckpt, tiny_model)
    assert "header" in str(e.value).lower(), e.value
    assert not marker.exists()


def test_adapters_never_unpickle(tmp_path, tiny_model_dir):
    from llmray.lora.adapter import AdapterError, load_adapter
    from llmray.model.checkpoint import load_config
    from llmray.train.peft_adapters import load_with_adapter

    marker = tmp_path / "pwned"
    cfg = load_config(tiny_model_dir)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    _pickle_file(adapter / "adapter_model.bin", marker)
    with pytest.raises(AdapterError, match="never unpickles"):
        load_adapter("a", adapter, cfg, max_rank=16)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_with_adapter(tiny_model_dir, adapter)  # the merge/generate path (peft) is refused up front
    _pickle_file(adapter / "adapter_model.safetensors", marker)
    with pytest.raises(AdapterError, match="not a valid safetensors"):
        load_adapter("a", adapter, cfg, max_rank=16)
    assert not marker.exists()


# --- path traversal -----------------------------------------------------------------------------------------
TRAVERSAL = [
    "../../etc/passwd",
    "..",
    "a/../../b",
    "/etc/passwd",
    "..\\..\\win",
    "a/b",
    "",
    ".hidden",
    "x" * 200,
]


@pytest.mark.parametrize("name", TRAVERSAL)
def test_adapter_names_that_are_paths_are_refused(name):
    with pytest.raises(ValueError, match="invalid LoRA adapter name"):
        check_adapter_name(name)


def test_good_adapter_names_pass():
    for name in ("sql", "my-adapter_v1.2", "A0"):
        assert check_adapter_name(name) == name


def test_serve_args_refuse_traversal_names(tmp_path, tiny_model_dir):
    from llmray.serve.app import build_app

    with pytest.raises(ValueError, match="invalid LoRA adapter name"):
        build_app(
            {
                "model": str(tiny_model_dir),
                "engine_factory": MOCK_ENGINE,
                "loras": {"../../etc": str(tmp_path)},
            }
        )


@pytest.mark.parametrize("name", ["../../etc/passwd", "..%2F..%2Fetc", "/etc/passwd", "mock-model/../x"])
def test_requests_naming_a_path_as_model_are_404(client, name):
    r = client.post("/v1/completions", headers=AUTH, json={"model": name, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def _fake_adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (path / "adapter_model.safetensors").write_bytes(b"")  # the mock engine never reads it
    return path


def test_lora_loading_routes_refuse_traversal(tmp_path):
    """Runtime adapter loading (``--lora-root``): path-like names and paths that leave the root are 400s."""
    root = tmp_path / "loras"
    _fake_adapter(root / "good")
    outside = _fake_adapter(tmp_path / "outside")
    (root / "link").symlink_to(outside, target_is_directory=True)  # a symlink escaping the root
    server = LLMServer(
        "unused", MODEL, engine_factory=MOCK_ENGINE, engine_kwargs={"token_delay_s": 0.0}, enable_metrics=False,
        lora_root=str(root),
    )  # fmt: skip
    app = build_openai_app(LocalBackend(server), IngressConfig(MODEL, api_key=KEY, dynamic_loras=True))
    client = TestClient(app, raise_server_exceptions=False)
    assert {("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")} <= set(v1_routes(app))

    def load(name: str, path: str):
        return client.post("/v1/load_lora_adapter", headers=AUTH, json={"lora_name": name, "lora_path": path})

    for name in TRAVERSAL:
        r = load(name, "good")
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", (name, r.text[:200])
    for path in ("../outside", str(outside), "good/../../outside", "link", "/etc", "../../../../etc/passwd"):
        r = load("ok-name", path)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (path, r.text[:200])
        assert len(r.json()["error"]["message"]) <= MAX_MESSAGE_CHARS
    r = client.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "../good"})
    assert 400 <= r.status_code < 500
    assert load("fine", "good").status_code == 200  # the route works for a proper name and path
    for name in ("../outside", "good/../link", "../loras/good", "/etc"):  # requests name adapters, not paths
        body = {"model": name, "prompt": "hi", "max_tokens": 2}
        r = client.post("/v1/completions", headers=AUTH, json=body)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", (name, r.text[:200])
    models = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert "fine" in models and "ok-name" not in models
