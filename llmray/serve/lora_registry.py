"""The adapter registry shared by every ``LLMServer`` replica: adapter name -> PEFT directory.

Where it lives: a JSON file, ``<lora_root>/.llmray-adapters.json``. Why a file and not a named Ray actor:
the adapters themselves must already be readable by every replica under ``--lora-root`` (a shared volume
on KubeRay), so a file next to them adds no new requirement; it survives a restart of the Serve app or
of the whole Ray cluster (adapters loaded at runtime come back); it needs no actor lifecycle (detached
actors outlive their app and must be cleaned up); and it is testable without Ray. Writes take an
exclusive ``fcntl`` lock on ``<lora_root>/.llmray-adapters.lock`` and replace the file atomically
(temp file + ``os.replace``), so readers need no lock and never see half a file. Readers cache the parsed
file and re-read it only when ``stat`` says it changed (inode, mtime_ns, size): one ``stat`` per adapter
request.

File format::

    {"format": 1, "seed": "<deployment token>", "next_version": 7,
     "adapters": {"name": {"path": "/abs/dir", "version": 6, "created": 1732800000}},
     "unloaded": {"name": "/abs/dir"}}

``unloaded``: adapters unloaded at runtime; a restarted server does not bring back a ``--lora-root``
sub-directory recorded there (the same name and path), until it is loaded again. ``--lora NAME=DIR`` on
the command line always serves its adapter.

``version`` grows on every (re)load of a name, so a replica holding an older version of an adapter
reloads it. ``seed``: the startup adapters (``--lora NAME=DIR`` and the adapter sub-directories of
``--lora-root``) are merged into the file once per deployment (every replica of one deployment shares
the token that ``build_app`` draws), so a replica started later by the autoscaler does not bring back an
adapter that was unloaded meanwhile, while a restarted server does.

Security: adapter names pass ``protocol.check_adapter_name`` (one path component: letters, digits, ``._-``,
no ``..``) and differ from the base model's name; a runtime
``lora_path`` must resolve (symlinks followed) to a directory strictly under the root (``resolve_under``).
Without a root there is no registry file: only the startup adapters are served, and loading or unloading
at runtime is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmray.serve.errors import clip
from llmray.serve.protocol import check_adapter_name

logger = logging.getLogger("llmray.serve")

REGISTRY_FILE = ".llmray-adapters.json"
LOCK_FILE = ".llmray-adapters.lock"
FORMAT = 1
_UNCHANGED = object()  # returned by an update that needs no write


class RegistryError(ValueError):
    """A request the registry refuses (bad name, path outside the root, no root); the message says why."""


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: str  # absolute directory
    version: int  # grows on every (re)load of the name
    created: int  # unix seconds of the load (the OpenAI model card's `created`)


def is_adapter_name(name: object) -> bool:
    try:
        check_adapter_name(name)
    except ValueError:
        return False
    return True


def validate_name(name: object, base_name: str) -> str:
    """``name`` if it can name an adapter, else RegistryError saying what a valid name is."""
    try:
        checked = check_adapter_name(name)
    except ValueError as e:
        raise RegistryError(str(e)) from None
    if checked == base_name:
        raise RegistryError(f"adapter name {checked!r} is the base model's name; choose another name")
    return checked


def resolve_under(root: str | Path, lora_path: str) -> Path:
    """The directory ``lora_path`` names (relative to ``root``, or absolute), symlinks resolved, which must
    lie strictly under ``root``; RegistryError naming the problem otherwise."""
    root_dir = Path(root).resolve()
    if not isinstance(lora_path, str) or not lora_path.strip() or "\x00" in lora_path:
        raise RegistryError("lora_path must be a non-empty path to an adapter directory under the LoRA root")
    try:
        target = (root_dir / lora_path).resolve()  # an absolute lora_path replaces root_dir here
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        raise RegistryError(f"lora_path {lora_path[:200]!r} cannot be resolved ({e})") from None
    if target == root_dir or not target.is_relative_to(root_dir):
        raise RegistryError(
            f"lora_path {lora_path[:200]!r} resolves to {target}, which is not under the LoRA root "
            f"{root_dir}; adapters load only from sub-directories of --lora-root"
        )
    try:
        is_dir = target.is_dir()
    except OSError as e:  # e.g. a name too long for the file system
        raise RegistryError(f"lora_path {lora_path[:200]!r} cannot be read ({e.strerror})") from None
    if not is_dir:
        raise RegistryError(f"lora_path {lora_path[:200]!r}: {target} is not a directory")
    return target


def adapter_problem(path: str | Path) -> str | None:
    """Why the PEFT directory ``path`` cannot load (checked without torch: the config's JSON, its peft_type
    and rank, the weights file), or None. The engine checks the tensors when it loads the adapter."""
    path = Path(path)
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, UnicodeDecodeError) as e:
        return f"adapter_config.json cannot be read ({e})"
    except json.JSONDecodeError as e:
        return f"adapter_config.json is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})"
    if not isinstance(cfg, dict):
        return "adapter_config.json does not hold a JSON object"
    if cfg.get("peft_type", "LORA") != "LORA":
        return f"peft_type must be LORA, got {clip(cfg.get('peft_type'))!r}"
    rank = cfg.get("r", 1)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return f"r must be a positive integer, got {clip(rank)!r}"
    if not (path / "adapter_model.safetensors").is_file():
        pickled = (path / "adapter_model.bin").exists()
        return ("only a pickle-based adapter_model.bin" if pickled else "no weights") + (
            "; expected adapter_model.safetensors"
        )
    return None


def scan_root(root: str | Path) -> dict[str, str]:
    """{sub-directory name: path} for each sub-directory of ``root`` that holds an adapter_config.json.

    A symlink leading out of the root (``load_lora_adapter`` refuses it) and a directory that cannot load
    (``adapter_problem``) are skipped, each with a warning naming the reason.
    """
    found = {}
    for sub in sorted(Path(root).iterdir()):
        if not (sub / "adapter_config.json").exists():
            continue
        try:
            resolve_under(root, sub.name)
        except RegistryError as e:
            logger.warning("skipping adapter directory %s: %s", sub, e)
            continue
        problem = adapter_problem(sub)
        if problem is not None:
            logger.warning("skipping adapter directory %s: %s", sub, problem)
            continue
        found[sub.name] = str(sub)
    return found


class LoraRegistry:
    """Name -> directory for one served base model; file-backed when ``root`` is set (see module doc)."""

    def __init__(
        self,
        root: str | None,
        base_name: str,
        startup: dict[str, str] | None = None,
        seed: str | None = None,
    ) -> None:
        self.base_name = base_name
        self.root = Path(root).resolve() if root else None
        startup = dict(startup or {})
        self._scanned: set[str] = set()  # startup names found under the root (not given as --lora)
        if self.root is not None:
            if not self.root.is_dir():
                raise ValueError(f"lora_root {root!r} is not a directory")
            for name, path in scan_root(self.root).items():
                if is_adapter_name(name) and name != base_name:
                    if name not in startup:
                        self._scanned.add(name)
                    startup.setdefault(name, path)
                else:
                    logger.warning(
                        "not serving adapter directory %s: %r is not a valid adapter name", path, name
                    )
        for name in startup:
            validate_name(name, base_name)
        self._static = {
            n: AdapterEntry(n, str(Path(p).resolve()), 0, int(time.time())) for n, p in startup.items()
        }
        self._cache_key: tuple[int, int, int] | None = None
        self._cache: dict[str, AdapterEntry] = {}
        if self.root is not None:
            self._seed(seed or "")

    def _file(self) -> Path:
        """The registry file of a file-backed registry (the static one has none)."""
        assert self.root is not None, "only a file-backed registry (--lora-root) has a file"
        return self.root / REGISTRY_FILE

    # --- reading --------------------------------------------------------------------------------
    def entries(self) -> dict[str, AdapterEntry]:
        """Every adapter now registered (re-reads the file only when it changed)."""
        if self.root is None:
            return dict(self._static)
        try:
            st = os.stat(self._file())
        except FileNotFoundError:
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._cache_key:
            self._cache = {
                n: AdapterEntry(n, e["path"], int(e["version"]), int(e.get("created", 0)))
                for n, e in self._read()["adapters"].items()
            }
            self._cache_key = key
        return dict(self._cache)

    def get(self, name: str) -> AdapterEntry | None:
        return self.entries().get(name)

    def _read(self) -> dict:
        try:
            data = json.loads(self._file().read_text())
        except FileNotFoundError:
            data = {}
        except json.JSONDecodeError as e:
            raise RuntimeError(
                f"the adapter registry {self._file()} is corrupt ({e}); delete it to reset"
            ) from None
        data.setdefault("format", FORMAT)
        data.setdefault("adapters", {})
        data.setdefault("next_version", 1)
        return data

    # --- writing (file-backed only) -------------------------------------------------------------
    def _update(self, change: Any) -> Any:
        """Run ``change(data)`` on the file's contents under the lock and write the result atomically."""
        if self.root is None:
            raise RegistryError(
                "loading or unloading adapters at runtime needs the shared registry: start the server with "
                "--lora-root DIR"
            )
        with open(self.root / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._read()
                result = change(data)
                if result is _UNCHANGED:
                    return result
                fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".llmray-adapters.", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1, sort_keys=True)
                    os.replace(tmp, self._file())
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return result

    def _seed(self, seed: str) -> None:
        def change(data: dict) -> object:
            if data.get("seed") == seed and seed:
                return _UNCHANGED  # this deployment already seeded the file: keep what was unloaded since
            data["seed"] = seed
            unloaded = data.setdefault("unloaded", {})
            for name, e in self._static.items():
                if name in self._scanned and unloaded.get(name) == e.path:
                    logger.info("not serving adapter %s (%s): it was unloaded", name, e.path)
                    continue
                unloaded.pop(name, None)
                data["adapters"][name] = {
                    "path": e.path,
                    "version": data["next_version"],
                    "created": e.created,
                }
                data["next_version"] += 1
            return None

        self._update(change)

    def register(self, name: str, path: str | Path) -> AdapterEntry:
        """Add or replace ``name`` -> ``path`` (already validated by the caller); returns the new entry."""

        def change(data: dict) -> AdapterEntry:
            entry = AdapterEntry(name, str(path), int(data["next_version"]), int(time.time()))
            data["adapters"][name] = {"path": entry.path, "version": entry.version, "created": entry.created}
            data["next_version"] = entry.version + 1
            data.setdefault("unloaded", {}).pop(name, None)
            return entry

        return self._update(change)

    def unregister(self, name: str) -> bool:
        """Remove ``name``; False when it was not registered."""

        def change(data: dict) -> object:
            entry = data["adapters"].pop(name, None)
            if entry is None:
                return _UNCHANGED
            data.setdefault("unloaded", {})[name] = entry["path"]  # a restart does not bring it back
            return True

        return self._update(change) is True
