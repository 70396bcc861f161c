"""Inputs split into shards, and one output file per shard written atomically (the unit of resumption).

``plan_shards`` lists JSONL/Parquet inputs (local paths, directories, globs; ``s3://``-style URIs through
pyarrow's filesystems) and cuts each file into shards of ``shard_rows`` rows (JSONL: line ranges found by one
scan, byte offsets recorded so a reader seeks straight to its shard; Parquet: row ranges from the footer).
``read_shard`` runs in Ray Data tasks and yields each row as its JSON text plus its 1-based line (row)
number; ``write_shard`` writes a finished shard to a temporary name and renames it, so an output file exists
only when complete. ``Manifest`` (``_llmray_batch.json`` in the output directory) pins the plan, so a rerun
with the same inputs skips the shards whose files exist and refuses a different plan.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST = "_llmray_batch.json"
JSONL_EXTS = (".jsonl", ".json", ".ndjson")
PARQUET_EXTS = (".parquet",)


def _fs(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def input_format(path: str) -> str:
    suffix = Path(path.split("?")[0]).suffix.lower()
    if suffix in JSONL_EXTS:
        return "jsonl"
    if suffix in PARQUET_EXTS:
        return "parquet"
    raise ValueError(f"cannot tell the format of {path}: use .jsonl (one JSON object per line) or .parquet")


def resolve_inputs(spec: str) -> list[str]:
    """Comma-separated files, directories (their .jsonl/.parquet files) or globs; URIs list their prefix."""
    import pyarrow.fs as pafs

    out: list[str] = []
    for entry in (e.strip() for e in str(spec).split(",") if e.strip()):
        if "://" in entry:
            fs, path = _fs(entry)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                scheme = entry.split("://", 1)[0]
                out.extend(sorted(f"{scheme}://{f.path}" for f in found if f.is_file and _known(f.path)))
            elif info.type == pafs.FileType.File:
                out.append(entry)
            else:
                raise FileNotFoundError(f"--input {entry} does not exist")
            continue
        matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
        if not matches:
            raise FileNotFoundError(f"--input {entry!r} matches no file")
        for m in matches:
            if os.path.isdir(m):
                out.extend(
                    sorted(os.path.abspath(p) for p in Path(m).rglob("*") if p.is_file() and _known(str(p)))
                )
            else:
                out.append(os.path.abspath(m))
    if not out:
        raise FileNotFoundError(f"--input {spec!r} names no .jsonl or .parquet file")
    formats = {input_format(p) for p in out}
    if len(formats) > 1:
        raise ValueError("--input mixes JSONL and Parquet files; pass one format per run")
    return out


def _known(path: str) -> bool:
    return Path(path).suffix.lower() in JSONL_EXTS + PARQUET_EXTS


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one input file (0-based line or row numbers); ``offset``: its first byte."""

    name: str  # output file stem, unique in the run
    path: str
    fmt: str
    start: int
    stop: int
    offset: int
    rows: int  # rows it yields (JSONL: non-blank lines)


def _shard_name(path: str, index: int) -> str:
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    return f"{Path(path.split('?')[0]).stem}-{digest}-{index:05d}"


def _lines(f: Any) -> Iterator[bytes]:
    """Lines of a binary file-like object (pyarrow's streams included), newline kept."""
    rest = b""
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


def _jsonl_shards(path: str, shard_rows: int) -> list[Shard]:
    fs, p = _fs(path)
    shards: list[Shard] = []
    line, offset, start, start_off, rows = 0, 0, 0, 0, 0
    with fs.open_input_stream(p) as f:
        for raw in _lines(f):
            if line - start == shard_rows:
                shards.append(
                    Shard(_shard_name(path, len(shards)), path, "jsonl", start, line, start_off, rows)
                )
                start, start_off, rows = line, offset, 0
            rows += bool(raw.strip())
            line += 1
            offset += len(raw)
    if line > start:
        shards.append(Shard(_shard_name(path, len(shards)), path, "jsonl", start, line, start_off, rows))
    return shards


def _parquet_shards(path: str, shard_rows: int) -> list[Shard]:
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    with fs.open_input_file(p) as f:
        n = pq.ParquetFile(f).metadata.num_rows
    return [
        Shard(_shard_name(path, i), path, "parquet", s, min(s + shard_rows, n), 0, min(s + shard_rows, n) - s)
        for i, s in enumerate(range(0, n, shard_rows))
    ]


def plan_shards(inputs: list[str], shard_rows: int) -> list[Shard]:
    if shard_rows < 1:
        raise ValueError(f"--shard-rows must be >= 1, got {shard_rows}")
    shards: list[Shard] = []
    for path in inputs:
        make = _jsonl_shards if input_format(path) == "jsonl" else _parquet_shards
        shards.extend(make(path, shard_rows))
    return shards


def read_shard(item: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Data ``flat_map``: a shard's rows as {``_shard``, ``input_line`` (1-based), ``_json``}."""
    shard = Shard(**json.loads(item["shard"]))
    fs, p = _fs(shard.path)
    out = []
    if shard.fmt == "jsonl":
        with fs.open_input_file(p) as f:
            f.seek(shard.offset)
            for line, raw in zip(range(shard.start, shard.stop), _lines(f), strict=False):
                if raw.strip():
                    text = raw.decode("utf-8", errors="replace").strip()
                    out.append({"_shard": shard.name, "input_line": line + 1, "_json": text})
        return out
    import pyarrow.parquet as pq

    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        groups, first, at = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at < shard.stop and at + n > shard.start:
                groups.append(g)
                first = at if first is None else first
            at += n
        table = pf.read_row_groups(groups).slice(shard.start - (first or 0), shard.stop - shard.start)
    for i, row in enumerate(table.to_pylist()):
        text = json.dumps(row, default=str, ensure_ascii=False)
        out.append({"_shard": shard.name, "input_line": shard.start + i + 1, "_json": text})
    return out


def write_shard(out_dir: str, name: str, fmt: str, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` (sorted by input line) as ``name.jsonl``/``name.parquet``: a temporary file, then a
    rename, so the file exists only when complete. Returns its path."""
    rows = sorted(rows, key=lambda r: r["input_line"])
    fs, base = _fs(out_dir)
    final = f"{base}/{name}.{fmt}"
    tmp = f"{base}/.{name}.{fmt}.tmp-{os.getpid()}"
    if fmt == "jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode()
        with fs.open_output_stream(tmp) as f:
            f.write(data)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with fs.open_output_stream(tmp) as f:
            pq.write_table(pa.Table.from_pylist(rows), f)
    fs.move(tmp, final)
    return final


def done_shards(out_dir: str, fmt: str) -> set[str]:
    """Names of the shards whose output files exist (temporary files of a crashed run do not count)."""
    import pyarrow.fs as pafs

    fs, base = _fs(out_dir)
    found = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    suffix = f".{fmt}"
    return {Path(f.path).name[: -len(suffix)] for f in found if f.is_file and f.path.endswith(suffix)}


@dataclass
class Manifest:
    """The plan of a run, kept in the output directory so a rerun resumes the same plan."""

    inputs: list[str]
    shard_rows: int
    output_format: str
    shards: list[dict[str, Any]]

    @classmethod
    def load(cls, out_dir: str) -> Manifest | None:
        fs, base = _fs(out_dir)
        try:
            with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
                return cls(**json.loads(f.read().decode()))
        except FileNotFoundError:
            return None

    def save(self, out_dir: str) -> None:
        fs, base = _fs(out_dir)
        fs.create_dir(base, recursive=True)
        tmp = f"{base}/.{MANIFEST}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(asdict(self), indent=1).encode())
        fs.move(tmp, f"{base}/{MANIFEST}")

    def plan(self) -> list[Shard]:
        return [Shard(**s) for s in self.shards]
