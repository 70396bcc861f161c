"""Pretraining data on Ray Data: read -> tokenize (``map_batches``) -> split -> packed windows -> workers.

1. ``resolve_paths``: local files, directories (recursively), globs; ``s3://``/``gs://``/... URIs go
   to Ray Data untouched. Formats by extension: plain text (``.txt``, ``.md``, ``.py``, ...: one document
   per file), JSONL (``.jsonl``/``.json``, one document per line, ``text`` field) and parquet (``text``
   column).
2. ``tokenize_corpus``: ``map_batches`` runs the tokenizer over documents in parallel (``preserve_order``
   keeps file and row order), documents are joined with the eos token (a single text file has none, as in
   nanoGPT) into one token stream.
3. ``split_tokens``: deterministic train/validation split: the first 90% of the stream trains, the last
   10% validates (nanoGPT's split for a single text file).
4. ``train_windows_datasets``: packed fixed-length windows (seq_len + 1 tokens: inputs and shifted targets)
   as a Ray Dataset over row ids. Row ``i`` is a pure function of (i, seed): epoch ``e = i // n`` visits
   the ``n`` non-overlapping windows of the stream in a seeded permutation, shifted by a seeded offset in
   [0, seq_len) so every epoch sees different window boundaries. Worker ``r`` of ``w`` gets its own dataset
   (``get_dataset_shard(f"train_{r}")``) holding the r-th ``B`` rows of every step's ``w * B``, so every
   run (and every restart) feeds each worker the same batches: a resumed run skips the batches it
   already consumed and continues on the same data, and the global batch of a step is the same for any
   number of workers. ``local_batches`` yields the same rows
   without Ray (single process benchmarks, tests).

The token stream is held in memory (int32): fine for corpora up to a few hundred million tokens.
This module imports no torch at module level, so Ray Data's tokenizer actors start quickly.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmray.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

    from llmray.config import ModelConfig
    from llmray.train.pretrain import PretrainConfig

TEXT_EXTS = (".txt", ".text", ".md", ".rst", ".py")
JSON_EXTS = (".jsonl", ".json", ".ndjson")
PARQUET_EXTS = (".parquet",)


def resolve_paths(data: str | list[str]) -> list[str]:
    """Expand comma-separated paths, directories and globs; URIs (``scheme://``) pass through."""
    entries = data if isinstance(data, list) else [d for d in str(data).split(",") if d.strip()]
    out: list[str] = []
    for entry in entries:
        entry = entry.strip()
        if "://" in entry:
            out.append(entry)
            continue
        matches = sorted(glob.glob(os.path.expanduser(entry), recursive=True))
        if not matches:
            raise FileNotFoundError(f"--data {entry!r} matches no file")
        for m in matches:
            if os.path.isdir(m):
                exts = TEXT_EXTS + JSON_EXTS + PARQUET_EXTS
                out.extend(sorted(str(p) for p in Path(m).rglob("*") if p.is_file() and p.suffix in exts))
            else:
                out.append(m)
    if not out:
        raise FileNotFoundError(f"--data {data!r} names no readable files (text, JSONL or parquet)")
    return out


def file_format(path: str) -> str:
    suffix = Path(path.split("?")[0]).suffix.lower()
    if suffix in JSON_EXTS:
        return "json"
    if suffix in PARQUET_EXTS:
        return "parquet"
    if suffix in TEXT_EXTS or suffix == "":
        return "text"
    raise ValueError(
        f"cannot tell the format of {path}: use .txt/.md/.py (plain text), .jsonl (a 'text' field per line) "
        "or .parquet (a 'text' column)"
    )


def read_documents(paths: list[str], text_field: str = "text"):
    """A Ray Dataset with one ``text`` row per document, in file order."""
    import ray.data

    formats = {file_format(p) for p in paths}
    if len(formats) > 1:
        raise ValueError(f"--data mixes formats {sorted(formats)}; pass files of one format per run")
    fmt = formats.pop()
    blocks = _small_corpus_blocks(paths)
    if fmt == "text":
        ds = ray.data.read_binary_files(paths, include_paths=False, override_num_blocks=blocks)
        return ds.map_batches(_decode_bytes, batch_format="numpy", num_cpus=0.25)
    if fmt == "json":
        ds = ray.data.read_json(paths, lines=True, override_num_blocks=blocks)
    else:
        ds = ray.data.read_parquet(paths, columns=[text_field], override_num_blocks=blocks)
    if text_field not in ds.columns():
        raise ValueError(f"{paths[0]} has no {text_field!r} field; columns are {ds.columns()}")
    return (
        ds.select_columns([text_field]).rename_columns({text_field: "text"}) if text_field != "text" else ds
    )


def _small_corpus_blocks(paths: list[str], block_bytes: int = 4 << 20) -> int | None:
    """Read blocks for a small local corpus (one per ~4 MiB, at least 2, at most one per file); None (Ray
    Data decides) for a large or remote one. Ray Data reads at least 2 x the logical CPUs in parallel, each
    read task a new worker process: an 11-file, 0.3 MB corpus on an 8-CPU head started 8 (~4 CPU-s each)."""
    if not all(os.path.isfile(p) for p in paths):
        return None
    total = sum(os.path.getsize(p) for p in paths)
    return None if total > 64 * block_bytes else min(len(paths), max(2, -(-total // block_bytes)))


def _decode_bytes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"text": np.array([b.decode("utf-8", errors="replace") for b in batch["bytes"]], dtype=object)}


class _TokenizeBatch:
    """Ray Data UDF: the tokenizer is built once per actor from its JSON form."""

    def __init__(self, tokenizer_json: str, tokenizer_config: dict[str, Any], eos_id: int | None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = Tokenizer(HFTokenizer.from_str(tokenizer_json), tokenizer_config)
        self.eos_id = eos_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = self.tok.encode_batch([str(t) for t in batch["text"]])
        if self.eos_id is not None:
            ids = [x + [self.eos_id] for x in ids]
        flat = np.fromiter((i for x in ids for i in x), dtype=np.int32)
        # one output row per input batch: (1,) object array holding the batch's token stream
        out = np.empty(1, dtype=object)
        out[0] = flat
        return {"ids": out}


def _no_restarts() -> dict[str, Any]:
    """Actor options: constructor args live in the object store, and Ray logs an error line on the console
    for every restartable actor built from such args."""
    return {"max_restarts": 0}


def _map_actors(ds: Any, fn: Any, **kwargs: Any) -> Any:
    """``ds.map_batches`` on actors that are not restarted (see ``_no_restarts``).

    Ray 2.60 names no parameter for max_restarts and warns that ``ray_remote_args_fn`` goes in 2.64.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        return ds.map_batches(fn, ray_remote_args_fn=_no_restarts, **kwargs)


def tokenize_corpus(ds, tokenizer: Tokenizer, add_eos: bool, batch_size: int = 64) -> np.ndarray:
    """Tokenize every document (Ray Data ``map_batches``) and concatenate them in order: (N,) int32."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        raise ValueError("the tokenizer has no eos token to separate documents with")
    tokenized = _map_actors(
        ds,
        _TokenizeBatch,
        fn_constructor_kwargs=dict(
            tokenizer_json=tokenizer.backend.to_str(), tokenizer_config=tokenizer.config, eos_id=eos
        ),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.25,
    )
    parts = [np.asarray(row["ids"], dtype=np.int32) for row in tokenized.iter_rows()]
    if not parts:
        raise ValueError("the corpus holds no documents")
    return np.concatenate(parts)


def corpus_texts(ds, max_chars: int | None = None) -> Iterator[str]:
    """Documents of a Ray Dataset in order (to train a tokenizer), stopping after ``max_chars``."""
    seen = 0
    for row in ds.iter_rows():
        text = str(row["text"])
        yield text
        seen += len(text)
        if max_chars is not None and seen >= max_chars:
            return


def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """First ``1 - val_fraction`` of the stream trains, the rest validates (nanoGPT's split)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


class WindowSampler:
    """Row id -> start of a (seq_len + 1)-token window; deterministic in (row, seed)."""

    def __init__(self, num_tokens: int, seq_len: int, seed: int) -> None:
        self.seq_len = seq_len
        self.seed = seed
        self.per_epoch = (num_tokens - 1 - seq_len) // seq_len  # windows per epoch, any offset fits
        if self.per_epoch < 1:
            raise ValueError(
                f"the training split has {num_tokens} tokens, too few for one window of seq_len={seq_len} + 1"
            )
        self._cache: dict[int, tuple[np.ndarray, int]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._cache[epoch] = (rng.permutation(self.per_epoch), int(rng.integers(self.seq_len)))
        return self._cache[epoch]

    def starts(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.int64)
        epochs = rows // self.per_epoch
        for e in np.unique(epochs):
            perm, offset = self._epoch(int(e))
            sel = epochs == e
            out[sel] = perm[rows[sel] % self.per_epoch] * self.seq_len + offset
        return out

    def windows(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(len(rows), seq_len + 1) int64 token windows."""
        idx = self.starts(rows)[:, None] + np.arange(self.seq_len + 1)[None, :]
        return tokens[idx].astype(np.int64)


def rank_rows(local_rows: np.ndarray, rank: int, world: int, batch_size: int) -> np.ndarray:
    """Worker ``rank``'s i-th row -> global row: step k of the run reads global rows [k*world*B, (k+1)*world*B),
    worker r the r-th B of them, so the global batch of a step does not depend on the number of workers."""
    return (local_rows // batch_size) * world * batch_size + rank * batch_size + local_rows % batch_size


_SAMPLERS: dict[tuple[int, int, int], WindowSampler] = {}  # per task worker: (tokens, seq_len, seed)


def _window_batch(
    batch: dict[str, np.ndarray], tokens: Any, seq_len: int, seed: int, rank: int, world: int, batch_size: int
) -> dict[str, np.ndarray]:
    """Ray Data UDF (tasks): a worker's row ids -> packed windows. ``tokens`` is the stream's object ref,
    read from the node's object store without a copy; the epoch permutations are kept per process."""
    import ray

    stream = ray.get(tokens) if isinstance(tokens, ray.ObjectRef) else tokens  # (N,) int32
    key = (len(stream), seq_len, seed)
    if key not in _SAMPLERS:
        _SAMPLERS.clear()
        _SAMPLERS[key] = WindowSampler(len(stream), seq_len, seed)
    rows = rank_rows(batch["data"].astype(np.int64), rank, world, batch_size)
    return {"tokens": _SAMPLERS[key].windows(stream, rows)}


def train_windows_datasets(
    tokens: np.ndarray, seq_len: int, seed: int, rows_per_worker: int, num_workers: int, batch_size: int
) -> dict[str, Any]:
    """One Ray Dataset per worker, ``train_<rank>``: its ``rows_per_worker`` windows, in order.

    Each worker's rows are fixed by (seed, rank, world) rather than by how ``streaming_split`` happens
    to hand out blocks, so any run (and any restart) feeds every worker the same batches. The windows are
    cut by tasks (pooled Ray workers, reused across pipelines and restarts; an actor pool would start a
    process per worker and attempt).
    """
    import ray.data

    WindowSampler(len(tokens), seq_len, seed)  # validate sizes on the driver
    tokens_ref = ray.put(tokens)  # shipped once, shared by every worker's pipeline
    return {
        # row ids from the driver's object store, not ray.data.range: its read tasks take 1 CPU each, and
        # with the window tasks (0.25) that is more than a 2-CPU head has next to a 1-CPU worker (a hang)
        f"train_{rank}": ray.data.from_numpy(_row_id_blocks(rows_per_worker, batch_size)).map_batches(
            _window_batch,
            fn_kwargs=dict(
                tokens=tokens_ref,
                seq_len=seq_len,
                seed=seed,
                rank=rank,
                world=num_workers,
                batch_size=batch_size,
            ),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=0.25,
        )
        for rank in range(num_workers)
    }


def _row_id_blocks(rows: int, batch_size: int, batches_per_block: int = 64) -> list[np.ndarray]:
    """0..rows-1 as int64 blocks of ``batches_per_block`` batches (column ``data`` of ``from_numpy``)."""
    step = batch_size * batches_per_block
    return [np.arange(i, min(i + step, rows), dtype=np.int64) for i in range(0, rows, step)]


def local_batches(
    tokens: np.ndarray, seq_len: int, seed: int, batch_size: int, start_row: int = 0, device: Any = "cpu"
) -> Iterator[torch.Tensor]:
    """Without Ray: the rows ``train_windows_datasets`` gives a single worker, (B, seq_len + 1) int64."""
    import torch

    sampler = WindowSampler(len(tokens), seq_len, seed)
    row = start_row
    while True:
        rows = np.arange(row, row + batch_size)
        yield torch.from_numpy(sampler.windows(tokens, rows)).to(device, non_blocking=True)
        row += batch_size


def val_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping validation windows from the start of the split: (n, seq_len + 1)."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"the validation split has {len(tokens)} tokens, too few for seq_len={seq_len}")
    idx = (np.arange(n) * seq_len)[:, None] + np.arange(seq_len + 1)[None, :]
    return tokens[idx].astype(np.int64)


def prepare_corpus(cfg: PretrainConfig) -> tuple[Any, ModelConfig, np.ndarray, np.ndarray]:
    """Tokenizer (reused from ``out`` on resume, loaded, or trained), model config, train/val token streams."""
    from llmray.config import ModelConfig
    from llmray.model.tokenizer import char_tokenizer, train_bpe

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = resolve_paths(cfg.data)
    ds = read_documents(paths, cfg.text_field)
    trained_here = cfg.tokenizer in ("char", "bpe")
    if (out / "tokenizer.json").exists():
        tok = Tokenizer.load(out)  # a run in this directory already chose (or trained) it: keep ids stable
    elif cfg.tokenizer == "char":
        tok = char_tokenizer("".join(corpus_texts(ds)))
    elif cfg.tokenizer == "bpe":
        tok = train_bpe(corpus_texts(ds, max_chars=200_000_000), vocab_size=cfg.bpe_vocab)
    elif Path(cfg.tokenizer).is_dir():
        tok = Tokenizer.load(cfg.tokenizer)
    else:
        raise ValueError(
            f"--tokenizer must be char, bpe or a directory with tokenizer.json, got {cfg.tokenizer!r}"
        )
    tok.save(out)
    add_eos = len(paths) > 1 or file_format(paths[0]) != "text"
    tokens = tokenize_corpus(ds, tok, add_eos=add_eos)
    train, val = split_tokens(tokens, cfg.val_fraction)
    mc = ModelConfig.preset(cfg.preset)
    if trained_here:
        mc = mc.replace(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, bos_token_id=None)
    elif tok.vocab_size > mc.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} tokens but preset {cfg.preset} only {mc.vocab_size}"
        )
    return tok, mc, train, val
