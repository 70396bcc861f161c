"""Adapter registry for one engine: host-memory LRU of loaded adapters and a fixed set of device slots.

``add(name, path)`` validates and reads an adapter (AdapterError on a bad directory, the engine keeps
serving); ``acquire(name)`` returns the device slot holding it, loading it into a free slot or evicting the
least recently used slot that no running request holds; ``release(name)`` drops one hold.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from llmray.config import ModelConfig
from llmray.lora.adapter import MODULES, LoraAdapter, load_adapter
from llmray.lora.layers import LoraBatch, LoRALinear


class NoFreeSlot(RuntimeError):
    """Every device slot holds an adapter of a running request; try again after one finishes."""


def adapter_id(name: str, path: str | Path) -> int:
    """A stable positive id for prefix-cache hashes (same name and directory -> same id)."""
    digest = hashlib.blake2b(f"{name}\0{Path(path).resolve()}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big") + 1


class LoraManager:
    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        max_loras: int,
        max_rank: int,
        max_cpu_loras: int,
        max_rows: int,
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
            for module in MODULES:
                parent = layer.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                wrapped = LoRALinear(getattr(parent, module), max_loras, max_rank, self.batch)
                setattr(parent, module, wrapped)
                self.layers[(i, module)] = wrapped
        self.paths: dict[str, Path] = {}  # registered name -> directory
        self.host: OrderedDict[str, LoraAdapter] = OrderedDict()  # LRU of adapters read into host memory
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # LRU of device-resident adapters
        self.holds: dict[str, int] = {}  # running requests per adapter

    # --- registry ---------------------------------------------------------------------------------
    def add(self, name: str, path: str | Path) -> LoraAdapter:
        adapter = load_adapter(name, path, self.config, self.max_rank)  # validates before registering
        if name in self.slot_of and self.holds.get(name, 0) == 0:
            self._clear_slot(name)  # re-registered: the resident copy is stale
        self.paths[name] = Path(path)
        self._remember(adapter)
        return adapter

    def remove(self, name: str) -> None:
        if name not in self.paths:
            raise KeyError(name)
        if self.holds.get(name, 0):
            raise RuntimeError(f"adapter {name!r} is in use by {self.holds[name]} running request(s)")
        self.paths.pop(name)
        self.host.pop(name, None)
        if name in self.slot_of:
            self._clear_slot(name)

    def names(self) -> list[str]:
        return sorted(self.paths)

    def id_of(self, name: str) -> int:
        return adapter_id(name, self.paths[name])

    # --- device slots -------------------------------------------------------------------------------
    def can_acquire(self, name: str) -> bool:
        return (
            name in self.slot_of
            or len(self.slot_of) < self.max_loras
            or any(self.holds.get(n, 0) == 0 for n in self.slot_of)
        )

    def acquire(self, name: str) -> int:
        if name not in self.paths:
            raise KeyError(f"unknown adapter {name!r}")
        if name not in self.slot_of:
            self._load_into_slot(name)
        self.slot_of.move_to_end(name)
        self.holds[name] = self.holds.get(name, 0) + 1
        return self.slot_of[name]

    def release(self, name: str) -> None:
        if self.holds.get(name, 0) <= 0:
            raise RuntimeError(f"release of adapter {name!r} that is not held")
        self.holds[name] -= 1

    def _load_into_slot(self, name: str) -> None:
        used = set(self.slot_of.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if not free:
            victim = next((n for n in self.slot_of if self.holds.get(n, 0) == 0), None)
            if victim is None:
                raise NoFreeSlot(f"all {self.max_loras} LoRA slots hold adapters of running requests")
            free = [self._clear_slot(victim)]
        slot = free[0]
        adapter = self.host.get(name) or self._remember(
            load_adapter(name, self.paths[name], self.config, self.max_rank)
        )
        self.host.move_to_end(name)
        with torch.no_grad():
            for key, layer in self.layers.items():
                a, b = adapter.weights.get(key, (None, None))
                layer.load_slot(slot, a, b)
            self.batch.scales[slot] = adapter.scaling
        self.slot_of[name] = slot

    def _clear_slot(self, name: str) -> int:
        slot = self.slot_of.pop(name)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.load_slot(slot, None, None)
            self.batch.scales[slot] = 0.0
        return slot

    def _remember(self, adapter: LoraAdapter) -> LoraAdapter:
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)  # re-read from disk on next use
        return adapter
