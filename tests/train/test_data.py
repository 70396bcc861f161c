"""Ray Data pretraining pipeline: formats, order, split, deterministic windows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmray.model.tokenizer import char_tokenizer
from llmray.train import data as D

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20


def test_resolve_paths_globs_dirs_and_uris(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("y")
    assert D.resolve_paths(str(tmp_path / "*.txt")) == [str(tmp_path / "a.txt")]
    assert D.resolve_paths(str(tmp_path)) == [str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.txt")]
    assert D.resolve_paths("s3://bucket/corpus/*.parquet") == ["s3://bucket/corpus/*.parquet"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        D.resolve_paths(str(tmp_path / "nope*.txt"))
    with pytest.raises(ValueError, match="cannot tell the format"):
        D.file_format("data.csv")


def test_tokenize_text_jsonl_parquet_in_order(ray_local, tmp_path):
    """One tokenizing pipeline (an actor pool's start-up is most of one): the tokenizing stage is
    format-blind, so the formats are checked on their documents, and the no-separator stream in-process."""
    docs = [f"doc {i}: hear me speak." for i in range(30)]
    tok = char_tokenizer(TEXT + "".join(docs))
    # JSONL: documents in file order, each followed by eos, over several batches
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    ds = D.read_documents([str(tmp_path / "c.jsonl")])
    ids = D.tokenize_corpus(ds, tok, add_eos=True, batch_size=4)
    expected = [t for d in docs for t in tok.encode(d) + [tok.eos_token_id]]
    assert ids.tolist() == expected
    # plain text: the whole file is one document; without separators the stream is exactly the
    # tokenizer's encoding (nanoGPT's stream), as the tokenizing stage builds it
    (tmp_path / "input.txt").write_text(TEXT)
    ds = D.read_documents(D.resolve_paths(str(tmp_path / "input.txt")))
    assert [r["text"] for r in ds.take_all()] == [TEXT]
    udf = D._TokenizeBatch(tok.backend.to_str(), tok.config, eos_id=None)
    assert udf({"text": np.array([TEXT], dtype=object)})["ids"][0].tolist() == tok.encode(TEXT)
    # parquet with another column name: the same documents in order
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    ds = D.read_documents([str(tmp_path / "c.parquet")], text_field="body")
    assert [r["text"] for r in ds.take_all()] == docs


def test_split_is_first_90_last_10():
    tokens = np.arange(1000, dtype=np.int32)
    train, val = D.split_tokens(tokens, 0.1)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))


def test_windows_deterministic_cover_epoch_and_shift():
    tokens = np.arange(10_000, dtype=np.int32)
    s = D.WindowSampler(len(tokens), seq_len=16, seed=3)
    rows = np.arange(3 * s.per_epoch)
    w = s.windows(tokens, rows)
    assert w.shape == (len(rows), 17)
    assert (np.diff(w, axis=1) == 1).all()  # contiguous slices of the stream
    assert np.array_equal(
        w, D.WindowSampler(len(tokens), 16, 3).windows(tokens, rows)
    )  # same seed, same rows
    e0 = w[: s.per_epoch, 0]
    assert len(set((e0 - e0.min()) % 16)) == 1 and len(set(e0)) == s.per_epoch  # one epoch: all windows once
    offsets = {int(w[e * s.per_epoch, 0] % 16) for e in range(3)}
    assert not np.array_equal(w[: s.per_epoch, 0], w[s.per_epoch : 2 * s.per_epoch, 0])  # new order per epoch
    assert len(offsets) >= 2  # and (almost surely) new window boundaries
    # the local iterator yields exactly these rows
    it = D.local_batches(tokens, 16, 3, batch_size=8, start_row=5)
    assert np.array_equal(next(it).numpy(), w[5:13])


def test_ray_worker_datasets_interleave_to_the_single_worker_rows(ray_local):
    tokens = np.arange(5000, dtype=np.int32)
    dss = D.train_windows_datasets(
        tokens, seq_len=32, seed=1, rows_per_worker=16, num_workers=2, batch_size=4
    )
    w0, w1 = (np.stack([r["tokens"] for r in dss[f"train_{r}"].iter_rows()]) for r in range(2))
    # step k: worker 0 holds global rows [8k, 8k+4), worker 1 [8k+4, 8k+8): together one worker's 2x batch
    local = iter(D.local_batches(tokens, 32, 1, batch_size=8))
    for k in range(4):
        assert np.array_equal(
            np.concatenate([w0[4 * k : 4 * k + 4], w1[4 * k : 4 * k + 4]]), next(local).numpy()
        )
