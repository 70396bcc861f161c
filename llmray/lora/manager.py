"""Adapter registry for one engine: host-memory LRU of loaded adapters and a fixed set of device slots.

``add(name, path)`` validates and reads an adapter (AdapterError on a bad directory, the engine keeps
serving). A request takes ``get(name)`` (the registered adapter, with its version) when it is accepted;
``acquire(adapter)`` at admission returns the device slot holding that version, loading it into a free slot
or evicting the least recently used slot that no running request holds; ``release(slot)`` drops one hold.

A request always runs on the adapter version it was accepted with: removing or re-registering a name
while requests use it *retires* the old version's slot (new requests no longer see it; it is cleared
when its last hold is released). Nothing accepted is lost by a load or unload.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmray.config import ModelConfig
from llmray.lora.adapter import MODULES, LoraAdapter, load_adapter
from llmray.lora.layers import LoraBatch, LoRALinear, ShrinkGroup

if TYPE_CHECKING:
    from llmray.model.qwen3 import Qwen3ForCausalLM

_versions = itertools.count(1)


class NoFreeSlot(RuntimeError):
    """Every device slot holds an adapter of a running request; try again after one finishes."""


def adapter_id(name: str, path: str | Path) -> int:
    """A stable positive id for prefix-cache hashes: same name, directory and weights file -> same id."""
    path = Path(path).resolve()
    weights = path / "adapter_model.safetensors"
    stamp = f"{weights.stat().st_mtime_ns}:{weights.stat().st_size}" if weights.exists() else ""
    digest = hashlib.blake2b(f"{name}\0{path}\0{stamp}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big") + 1


class LoraManager:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        config: ModelConfig,
        max_loras: int,
        max_rank: int,
        max_cpu_loras: int,
        max_rows: int,
        wide: bool | None = None,
        tall: bool = True,
    ) -> None:
        if max_loras < 1 or max_cpu_loras < max_loras:
            raise ValueError(f"need 1 <= max_loras ({max_loras}) <= max_cpu_loras ({max_cpu_loras})")
        self.config, self.max_loras, self.max_rank, self.max_cpu_loras = (
            config,
            max_loras,
            max_rank,
            max_cpu_loras,
        )
        device = next(model.parameters()).device
        self.batch = LoraBatch(max_rows, max_loras, device)
        self.layers: dict[tuple[int, str], LoRALinear] = {}
        for i, layer in enumerate(model.model.layers):
            # one ShrinkGroup per GEMM site: q|k|v and gate|up (linears reading the same input), o, down
            groups: dict[str, tuple[ShrinkGroup, int]] = {}
            for members in (
                ("q_proj", "k_proj", "v_proj"),
                ("gate_proj", "up_proj"),
                ("o_proj",),
                ("down_proj",),
            ):
                owner = layer.self_attn if members[0] in ("q_proj", "o_proj") else layer.mlp
                weights = [getattr(owner, m).weight.detach() for m in members]
                group = ShrinkGroup(weights, max_loras, max_rank, self.batch, wide, tall and not wide)
                groups.update({m: (group, j) for j, m in enumerate(members)})
                if len(members) > 1:  # the model's fused q|k|v / gate|up projection runs through this hook
                    fused = "qkv" if members[0] == "q_proj" else "gate_up"
                    setattr(owner, f"{fused}_linear", group.linear)
                    if fused == "gate_up":  # the model's hook for gate|up + SwiGLU in one step
                        setattr(owner, "gate_up_act", group.gate_up_act)  # noqa: B010
                    if group.weight is not None:  # the fused base weight: a view of the group's [W | B]
                        setattr(owner, f"{fused}_weight", group.weight)
            for module in MODULES:
                parent = layer.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                shared, index = groups[module]
                wrapped = LoRALinear(getattr(parent, module), max_loras, max_rank, self.batch, shared, index)
                setattr(parent, module, wrapped)
                self.layers[(i, module)] = wrapped
        self.paths: dict[str, Path] = {}  # registered name -> directory
        self.ids: dict[str, int] = {}  # registered name -> prefix-cache adapter id
        self.versions: dict[str, int] = {}  # registered name -> version
        self.host: OrderedDict[str, LoraAdapter] = OrderedDict()  # LRU of registered adapters in host memory
        self.slot_of: OrderedDict[tuple[str, int], int] = OrderedDict()  # (name, version) -> slot, LRU
        self.holds: dict[int, int] = {}  # slot -> running requests using it
        self.retired: set[int] = set()  # slots of removed/replaced versions, cleared at their last release

    # --- registry ---------------------------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> LoraAdapter:
        """Validate and read an adapter (no state change: safe to call from any thread)."""
        return load_adapter(name, path, self.config, self.max_rank)

    def register(self, adapter: LoraAdapter) -> None:
        """Make a loaded adapter servable under its name (replacing any adapter of that name)."""
        if adapter.name in self.paths:
            self._unregister(adapter.name)
        adapter.version = next(_versions)
        self.paths[adapter.name] = adapter.path
        self.ids[adapter.name] = adapter_id(adapter.name, adapter.path)
        self.versions[adapter.name] = adapter.version
        self._remember(adapter)

    def add(self, name: str, path: str | Path) -> LoraAdapter:
        adapter = self.load(name, path)  # validates before registering
        self.register(adapter)
        return adapter

    def remove(self, name: str) -> None:
        """Unregister ``name``; requests accepted on it still run on it (see the module docstring)."""
        if name not in self.paths:
            raise KeyError(f"unknown LoRA adapter {name!r}")
        self._unregister(name)

    def _unregister(self, name: str) -> None:
        version = self.versions.pop(name)
        self.paths.pop(name)
        self.ids.pop(name)
        self.host.pop(name, None)
        slot = self.slot_of.get((name, version))
        if slot is not None:
            if self.holds.get(slot, 0):
                self.retired.add(slot)
            else:
                self._clear(self.slot_of.pop((name, version)))

    def names(self) -> list[str]:
        return sorted(list(self.paths))

    def id_of(self, name: str) -> int:
        return self.ids[name]

    def get(self, name: str) -> LoraAdapter:
        """The registered adapter ``name`` (re-read from disk if the host LRU dropped it)."""
        if name not in self.paths:
            raise KeyError(f"unknown LoRA adapter {name!r}")
        adapter = self.host.get(name)
        if adapter is None:
            adapter = self.load(name, self.paths[name])
            adapter.version = self.versions[name]
            self._remember(adapter)
        self.host.move_to_end(name)
        return adapter

    # --- device slots -------------------------------------------------------------------------------
    def _free_slots(self) -> list[int]:
        used = set(self.slot_of.values())
        return [s for s in range(self.max_loras) if s not in used]

    def can_acquire(self, adapter: LoraAdapter) -> bool:
        return (
            (adapter.name, adapter.version) in self.slot_of
            or bool(self._free_slots())
            or any(self.holds.get(s, 0) == 0 for s in self.slot_of.values())
        )

    def acquire(self, adapter: LoraAdapter | str) -> int:
        """Hold the device slot of ``adapter`` (a name means its registered version), loading it if needed."""
        if isinstance(adapter, str):
            adapter = self.get(adapter)
        key = (adapter.name, adapter.version)
        if key not in self.slot_of:
            self._load_into_slot(adapter)
        self.slot_of.move_to_end(key)
        slot = self.slot_of[key]
        self.holds[slot] = self.holds.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        if self.holds.get(slot, 0) <= 0:
            raise RuntimeError(f"release of LoRA slot {slot} that is not held")
        self.holds[slot] -= 1
        if self.holds[slot] == 0 and slot in self.retired:
            self.retired.discard(slot)
            key = next(k for k, s in self.slot_of.items() if s == slot)
            self._clear(self.slot_of.pop(key))

    def _load_into_slot(self, adapter: LoraAdapter) -> None:
        free = self._free_slots()
        if not free:
            victim = next((k for k, s in self.slot_of.items() if self.holds.get(s, 0) == 0), None)
            if victim is None:
                raise NoFreeSlot(f"all {self.max_loras} LoRA slots hold adapters of running requests")
            free = [self.slot_of.pop(victim)]
        slot = free[0]
        with torch.no_grad():
            for key, layer in self.layers.items():
                a, b = adapter.weights.get(key, (None, None))
                layer.load_slot(slot, a, b)
            self.batch.scales[slot] = adapter.scaling
        self.slot_of[(adapter.name, adapter.version)] = slot
        if self.versions.get(adapter.name) != adapter.version:
            self.retired.add(slot)  # an old version for a request accepted before its unload

    def _clear(self, slot: int) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                layer.load_slot(slot, None, None)
            self.batch.scales[slot] = 0.0

    def _remember(self, adapter: LoraAdapter) -> LoraAdapter:
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)  # re-read from disk on next use
        return adapter
