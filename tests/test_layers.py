"""The package layers hold: every llmray import points down the table in CONTRIBUTING.md.

Reads each module's imports with ``ast`` (function-level imports included, so a lazy import cannot hide an
upward edge) and checks them against ``ALLOWED``. A test plants an upward import to show the check can fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmray"

# package -> the llmray packages it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "ray_start": set(),  # the Ray start retry: below every layer that starts Ray
    "kernels": set(),
    "model": {"config", "kernels"},
    "lora": {"config", "kernels", "model"},
    "engine": {"config", "model", "kernels", "lora"},
    "serve": {"config", "engine", "model", "lora", "ray_start"},
    "batch": {"config", "engine", "model", "lora", "ray_start"},
    "train": {"config", "model", "kernels", "lora", "ray_start"},
}
TOP = {"cli", "demo", "__init__", "__main__"}  # entry points: may import anything


def layer_of(path: Path) -> str:
    """llmray/engine/runner.py -> "engine"; llmray/config.py -> "config"."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def imported_layers(source: str, module: str) -> set[str]:
    """The llmray packages a module's source imports (absolute and relative imports)."""
    found = set()
    pkg_parts = module.split(".")[:-1]  # llmray.engine.runner -> [llmray, engine]
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:  # from . import x, y
                    names = [".".join(base + [a.name]) for a in node.names]
            elif node.module:
                names = [node.module]
                if node.module == "llmray":  # from llmray import engine
                    names = [f"llmray.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "llmray" and len(parts) > 1:
                found.add(parts[1])
    return found


def file_violations(path: Path, source: str) -> list[str]:
    """``llmray/kernels/x.py: kernels -> engine`` for each import of ``source`` (at ``path``) beyond its layer."""
    layer = layer_of(path)
    if layer in TOP:
        return []
    rel = path.relative_to(PACKAGE.parent)
    assert layer in ALLOWED, f"{rel}: package {layer!r} has no row in ALLOWED"
    module = ".".join(rel.with_suffix("").parts)
    deps = imported_layers(source, module) - ALLOWED[layer] - {layer}
    return [f"{rel}: {layer} -> {dep}" for dep in sorted(deps) if dep in ALLOWED or dep in TOP]


def violations() -> list[str]:
    return [v for path in sorted(PACKAGE.rglob("*.py")) for v in file_violations(path, path.read_text())]


def test_layers_hold_on_the_tree():
    assert violations() == []


@pytest.mark.parametrize(
    "source,module,expected",
    [
        ("from llmray.model.ops import rms_norm_ref", "llmray.kernels.rmsnorm", {"model"}),
        ("def f():\n    from llmray.serve import app", "llmray.engine.llm", {"serve"}),
        ("from ..engine import llm", "llmray.serve.server", {"engine"}),
        ("from . import ops", "llmray.model.qwen3", {"model"}),
        ("from llmray import train", "llmray.model.qwen3", {"train"}),
        ("import llmray.engine.llm as L", "llmray.kernels.lora", {"engine"}),
    ],
)
def test_import_reader_sees_every_form(source, module, expected):
    assert imported_layers(source, module) == expected


def test_planted_upward_import_fails():
    """A kernel module that imports the engine is reported (read as if it stood in llmray/kernels/)."""
    planted = PACKAGE / "kernels" / "_planted_upward_import.py"
    source = "import torch\n\ndef f():\n    from llmray.engine.llm import LLM  # planted\n"
    assert file_violations(planted, source) == ["llmray/kernels/_planted_upward_import.py: kernels -> engine"]
    assert file_violations(planted, "import torch\nfrom ._common import cdiv\n") == []  # within kernels


def test_torch_path_imports_without_triton():
    """The model and its torch op set load with triton unimportable (CPU installs without triton)."""
    code = textwrap.dedent(
        """
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked by the test")
        sys.meta_path.insert(0, NoTriton())
        import torch
        from llmray.config import ModelConfig
        from llmray.model.qwen3 import Qwen3ForCausalLM
        model = Qwen3ForCausalLM(ModelConfig.preset("tiny"), kernels="torch")
        print(tuple(model(torch.tensor([[1, 2, 3]])).shape), model.config.vocab_size)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, vocab = out.stdout.rsplit(" ", 1)
    assert shape == f"(1, 3, {int(vocab)})"
