"""How llguidance reads a spec as we mean it: ``closed_objects(schema)`` (objects with ``properties`` and no
``additionalProperties`` closed, as xgrammar and OpenAI's strict mode read them) and ``ascii_classes(regex)``
(``\\d`` / ``\\w`` as ASCII classes, as JSON schema patterns mean them); used by ``llguidance_backend.py``."""

from __future__ import annotations

from typing import Any

_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def closed_objects(node: Any) -> Any:
    """A copy of a schema whose ``pattern`` regexes use ASCII ``\\d`` / ``\\w`` (``ascii_classes``) and where every object schema with ``properties`` and no ``additionalProperties`` (nor
    ``unevaluatedProperties``) gets ``additionalProperties: false``: the strict reading xgrammar applies
    and OpenAI's strict mode asks for, so a document never runs on with invented keys."""
    if isinstance(node, list):
        return [closed_objects(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for k, v in node.items():
        if k in _SUBSCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: closed_objects(sub) for name, sub in v.items()}
        elif k in _SUBSCHEMA_LISTS and isinstance(v, list):
            out[k] = [closed_objects(sub) for sub in v]
        elif k in ("items", "additionalProperties", "additionalItems") and isinstance(v, dict):
            out[k] = closed_objects(v)
    if isinstance(node.get("pattern"), str):
        out["pattern"] = ascii_classes(node["pattern"])
    if "properties" in node and "additionalProperties" not in node and "unevaluatedProperties" not in node:
        out["additionalProperties"] = False
    return out


_ASCII_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_"}


def ascii_classes(regex: str) -> str:
    """``\\d`` / ``\\w`` (and ``\\D`` / ``\\W`` outside brackets) as ASCII classes: llguidance's regexes are Rust's,
    where they are Unicode classes; JSON schema patterns (ECMA-262) and xgrammar mean the ASCII ones."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        ch = regex[i]
        if ch == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if nxt.lower() in _ASCII_CLASSES and not (in_class and nxt.isupper()):
                cls = _ASCII_CLASSES[nxt.lower()]
                out.append(cls if in_class else f"[{'^' if nxt.isupper() else ''}{cls}]")
            else:
                out.append(regex[i : i + 2])
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
        elif ch == "]" and in_class and out and out[-1] != "[" and out[-1] != "[^":
            in_class = False
        out.append(ch)
        i += 1
    return "".join(out)
