"""Serving LoRA adapters: /v1/models cards, load/unload routes, path rules, the shared registry, routing.

The tests run the ingress over in-process ``LLMServer`` replicas on the mock engine (no Ray); one runs the
real engine with a peft adapter on the tiny model and compares with ``LLM(..., loras=...)``. Multiplexed
routing with streaming over two replicas on a local Ray Serve: test_serve_replicas.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from _support.local_backend import MOCK_ENGINE, LocalBackend
from fastapi.testclient import TestClient
from serve_helpers import fake_adapter

from llmray.serve.ingress import IngressConfig, build_openai_app
from llmray.serve.lora_registry import REGISTRY_FILE, LoraRegistry
from llmray.serve.server import LLMServer

MODEL = "base-model"
KEY = "sk-lora"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "loras"
    fake_adapter(root / "alpha")
    fake_adapter(root / "spare")
    return root


def make_client(root: Path | None, seed: str = "deploy-1", **kwargs) -> tuple[TestClient, LLMServer]:
    server = LLMServer(
        "unused",
        MODEL,
        engine_factory=MOCK_ENGINE,
        engine_kwargs={"token_delay_s": 0.0},
        enable_metrics=False,
        lora_root=None if root is None else str(root),
        lora_seed=seed,
        **kwargs,
    )
    config = IngressConfig(MODEL, api_key=KEY, dynamic_loras=True)
    return TestClient(build_openai_app(LocalBackend(server), config)), server


def complete(client: TestClient, model: str, **extra):
    body = {"model": model, "prompt": "hello there", "max_tokens": 6, "temperature": 0, **extra}
    return client.post("/v1/completions", headers=AUTH, json=body)


def load(client: TestClient, name: str, path: str, headers=AUTH):
    return client.post("/v1/load_lora_adapter", headers=headers, json={"lora_name": name, "lora_path": path})


def unload(client: TestClient, name: str, headers=AUTH):
    return client.post("/v1/unload_lora_adapter", headers=headers, json={"lora_name": name})


def test_models_list_adapters_with_parent(root, tmp_path):
    beta = fake_adapter(tmp_path / "elsewhere" / "beta")  # a startup --lora may live outside the root
    client, server = make_client(root, loras={"beta": str(beta)})
    cards = client.get("/v1/models", headers=AUTH).json()["data"]
    assert [c["id"] for c in cards] == [MODEL, "alpha", "beta", "spare"]
    for card in cards[1:]:
        assert card["object"] == "model" and card["parent"] == MODEL and card["root"] == card["id"]
        assert card["owned_by"] == "llmray" and isinstance(card["created"], int) and card["created"] > 0
    assert cards[0]["parent"] is None
    assert server.engine.list_loras() == ["beta"]  # --lora preloaded; root sub-directories on first use
    assert complete(client, "alpha").status_code == 200
    assert server.engine.list_loras() == ["alpha", "beta"]


def test_load_request_unload_then_404(root):
    client, server = make_client(root)
    fake_adapter(root / "sql-v2")
    r = load(client, "sql", "sql-v2")
    assert r.status_code == 200, r.text
    assert r.json()["lora_name"] == "sql" and r.json()["lora_path"] == str((root / "sql-v2").resolve())
    assert "sql" in [c["id"] for c in client.get("/v1/models", headers=AUTH).json()["data"]]

    base, adapted = complete(client, MODEL), complete(client, "sql")
    assert base.status_code == adapted.status_code == 200
    assert adapted.json()["model"] == "sql" and adapted.json()["usage"]["completion_tokens"] == 6
    assert adapted.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]  # the adapter is used
    chunks = client.post("/v1/completions", headers=AUTH, json={"model": "sql", "prompt": "hello there",
                         "max_tokens": 6, "temperature": 0, "stream": True}).text  # fmt: skip
    assert chunks.rstrip().endswith("data: [DONE]") and '"model": "sql"' in chunks

    r = unload(client, "sql")
    assert r.status_code == 200 and r.json() == {"lora_name": "sql", "unloaded": True}
    assert "sql" not in server.engine.list_loras()
    r = complete(client, "sql")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "not_found_error" and err["param"] == "model" and err["code"] == "model_not_found"
    assert "'sql' does not exist" in err["message"]
    assert unload(client, "sql").status_code == 404
    assert complete(client, "never-heard-of-it").status_code == 404
    assert complete(client, MODEL).status_code == 200


def test_paths_outside_the_root_and_bad_names_are_400(root, tmp_path):
    client, _ = make_client(root)
    outside = fake_adapter(tmp_path / "outside")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "inside-link").symlink_to(root / "alpha", target_is_directory=True)
    for path in ("../outside", str(outside), "escape", ".", str(root), "alpha/../../outside"):
        r = load(client, "x", path)
        assert r.status_code == 400, (path, r.text)
        assert "not under the LoRA root" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "lora_path"
    r = load(client, "x", "missing")
    assert r.status_code == 400 and "is not a directory" in r.json()["error"]["message"]
    for name in ("../x", "a/b", "", "x" * 300):
        r = load(client, name, "alpha")
        assert r.status_code == 400 and "invalid LoRA adapter name" in r.json()["error"]["message"], name
    r = load(client, MODEL, "alpha")
    assert r.status_code == 400 and "base model's name" in r.json()["error"]["message"]
    r = client.post("/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert load(client, "via-link", "inside-link").status_code == 200  # a link that stays inside is fine
    names = set(json.loads((root / REGISTRY_FILE).read_text())["adapters"])
    assert names == {"alpha", "spare", "via-link"}  # nothing refused reached the registry


def test_bad_adapter_directory_is_400_and_serving_continues(root):
    client, _ = make_client(root)
    (root / "no-config").mkdir()
    (root / "no-config" / "adapter_model.safetensors").write_bytes(b"")
    r = load(client, "broken", "no-config")
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "invalid_adapter"
    assert "broken" not in [c["id"] for c in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert complete(client, "broken").status_code == 404
    assert complete(client, MODEL).status_code == 200 and complete(client, "alpha").status_code == 200


def test_lora_routes_need_the_api_key(root):
    client, _ = make_client(root)
    for r in (load(client, "x", "alpha", headers={}), unload(client, "alpha", headers={})):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = {"Authorization": "Bearer nope"}
    assert load(client, "x", "alpha", headers=bad).status_code == 401
    assert [c["id"] for c in client.get("/v1/models", headers=AUTH).json()["data"]] == [
        MODEL,
        "alpha",
        "spare",
    ]


def test_without_a_lora_root_runtime_loading_is_refused(tmp_path):
    beta = fake_adapter(tmp_path / "beta")
    client, _ = make_client(None, loras={"beta": str(beta)})
    r = load(client, "x", str(beta))
    assert r.status_code == 400 and "--lora-root" in r.json()["error"]["message"]
    assert unload(client, "beta").status_code == 400
    assert complete(client, "beta").status_code == 200  # startup adapters are still served


def test_replicas_share_the_registry(root):
    a, server_a = make_client(root)
    b, server_b = make_client(root)  # a second replica of the same deployment
    fake_adapter(root / "new")
    assert load(a, "fresh", "new").status_code == 200
    assert "fresh" in [c["id"] for c in b.get("/v1/models", headers=AUTH).json()["data"]]
    assert "fresh" not in server_b.engine.list_loras()
    r = complete(b, "fresh")  # B never got the load call: it loads on demand
    assert (
        r.status_code == 200
        and r.json()["choices"][0]["text"] == complete(a, "fresh").json()["choices"][0]["text"]
    )
    assert "fresh" in server_b.engine.list_loras()

    assert unload(b, "fresh").status_code == 200 and unload(b, "alpha").status_code == 200
    assert "fresh" in server_a.engine.list_loras()
    assert complete(a, "fresh").status_code == 404  # A consults the registry and drops it
    assert "fresh" not in server_a.engine.list_loras()

    # replacing a name elsewhere: replica A reloads the newer version on its next request
    assert load(b, "spare", "new").status_code == 200
    assert complete(a, "spare").status_code == 200
    assert (
        server_a.adapters.held["spare"]
        == LoraRegistry(str(root), MODEL, seed="deploy-1").get("spare").version
    )

    # a replica started later in the same deployment does not bring back the unloaded startup adapter...
    c, _ = make_client(root)
    assert complete(c, "alpha").status_code == 404
    # ...nor does a new deployment (a server restart): the registry file remembers the unload
    d, _ = make_client(root, seed="deploy-2")
    ids = [m["id"] for m in d.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids == [MODEL, "new", "spare"]
    assert json.loads((root / REGISTRY_FILE).read_text())["unloaded"]["alpha"] == str(root / "alpha")
    # loading it again clears the record: the next restart serves it
    assert load(d, "alpha", "alpha").status_code == 200
    e, _ = make_client(root, seed="deploy-3")
    assert [m["id"] for m in e.get("/v1/models", headers=AUTH).json()["data"]] == [
        MODEL,
        "alpha",
        "new",
        "spare",
    ]


def test_lora_root_lists_only_adapters_that_load(root, caplog):
    """A broken adapter directory under the root is skipped with the reason logged, never listed."""
    (root / "truncated").mkdir()
    (root / "truncated" / "adapter_config.json").write_text('{"peft_type": "LORA", "r"')
    (root / "truncated" / "adapter_model.safetensors").write_bytes(b"")
    (root / "no-weights").mkdir()
    (root / "no-weights" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    fake_adapter(root / "prefix")
    (root / "prefix" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with caplog.at_level(logging.WARNING, logger="llmray.serve"):
        client, _ = make_client(root)
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids == [MODEL, "alpha", "spare"]
    for name, why in [("truncated", "not valid JSON"), ("no-weights", "no weights"),
                      ("pickled", "pickle-based"), ("prefix", "peft_type must be LORA")]:  # fmt: skip
        assert any(name in r.getMessage() and why in r.getMessage() for r in caplog.records), (
            name,
            caplog.text,
        )
    assert complete(client, "truncated").status_code == 404


# --- the real engine ----------------------------------------------------------------------------------------
def peft_adapter(model_dir: Path, out: Path) -> Path:
    """A rank-4 q/v adapter with non-zero B (so it changes greedy outputs), written by peft."""
    from _support.lora import make_peft_adapter

    from llmray.model.checkpoint import load_model

    make_peft_adapter(load_model(model_dir, kernels="torch"), out, ["q_proj", "v_proj"], r=4, alpha=8, seed=3)
    return out


@pytest.mark.timeout(300)
def test_real_engine_serves_a_loaded_adapter_like_llm(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams

    root = tmp_path / "loras"
    root.mkdir()
    adapter = peft_adapter(tiny_model_dir, root / "tuned")
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not-unpickled")
    kw = {
        "max_num_seqs": 4,
        "num_kv_blocks": 64,
        "max_model_len": 128,
        "max_lora_rank": 8,
        "kernels": "torch",
    }
    server = LLMServer(str(tiny_model_dir), "tiny", engine_kwargs=kw, enable_metrics=False,
                       lora_root=str(root), lora_seed="real")  # fmt: skip
    client = TestClient(build_openai_app(LocalBackend(server), IngressConfig("tiny", dynamic_loras=True)))
    try:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "pickled"})
        assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "t1", "lora_path": "tuned"})
        assert r.status_code == 200, r.text
        body = {"prompt": "hello world", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        base = client.post("/v1/completions", json={"model": "tiny", **body}).json()
        served = client.post("/v1/completions", json={"model": "t1", **body}).json()
        on_demand = client.post("/v1/completions", json={"model": "tuned", **body}).json()  # root sub-dir
        assert served["usage"]["completion_tokens"] == 8 and served["choices"][0]["text"]
        assert served["choices"][0]["text"] != base["choices"][0]["text"]
        assert on_demand["choices"][0]["text"] == served["choices"][0]["text"]
        # unload (and load another) while a request on the adapter runs: it still gets every token
        long = {
            "model": "t1",
            "prompt": "hello world",
            "max_tokens": 40,
            "temperature": 0,
            "ignore_eos": True,
        }

        async def unload_midway() -> tuple[list[dict], dict, dict]:
            stream = server.stream("completions", long)
            events = list(await anext(stream))
            unloaded = await server.unload_adapter("t1")
            loaded = await server.load_adapter("t2", "tuned")
            async for batch in stream:
                events += batch
            return events, unloaded, loaded

        events, unloaded, loaded = asyncio.run(unload_midway())
        assert unloaded == {"lora_name": "t1", "unloaded": True} and loaded["lora_name"] == "t2"
        assert events[-1]["finish_reason"] == "length" and events[-1]["completion_tokens"] == 40
        midway_text = "".join(ev["text"] for ev in events)
        assert client.post("/v1/completions", json={"model": "t1", **body}).status_code == 404
    finally:
        server.engine.shutdown()
    llm = LLM(tiny_model_dir, loras={"t1": str(adapter)}, **kw)
    assert (
        midway_text
        == llm.generate(
            "hello world", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), lora="t1"
        )[0].text
    )
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expect = llm.generate("hello world", sp, lora="t1")[0]
    assert served["choices"][0]["text"] == expect.text
    assert base["choices"][0]["text"] == llm.generate("hello world", sp)[0].text


def test_registry_writes_from_many_writers_are_not_lost(root):
    """Concurrent register calls (separate registries = separate replicas) all land, versions unique."""
    from concurrent.futures import ThreadPoolExecutor

    regs = [LoraRegistry(str(root), MODEL, seed="deploy-1") for _ in range(4)]
    names = [f"a{i}" for i in range(24)]
    with ThreadPoolExecutor(4) as pool:
        entries = list(pool.map(lambda i: regs[i % 4].register(names[i], root / "alpha"), range(24)))
    on_disk = regs[0].entries()
    assert set(names) <= set(on_disk) and len({e.version for e in entries}) == 24
    assert all(on_disk[e.name].version == e.version for e in entries)
    assert regs[1].unregister("a3") and not regs[2].unregister("a3") and "a3" not in regs[3].entries()


def test_directory_discovery_skips_symlinks_out_of_the_root(root, tmp_path):
    from llmray.serve.lora_registry import scan_root

    outside = fake_adapter(tmp_path / "elsewhere")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "inside-link").symlink_to(root / "alpha", target_is_directory=True)
    found = scan_root(root)
    assert "escape" not in found and "inside-link" in found and "alpha" in found
