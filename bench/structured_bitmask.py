"""The grammar-mask kernel alone (llmray/kernels/token_bitmask.py) at bench/structured.py's shape: 256 rows of
bf16 logits over 151,936 tokens, 128 of them masked (every other row), with masks like the bench's (inside a
JSON string nearly every token is allowed; a few rows allow a handful). Per block size (tokens per program):
the median µs of ``apply_token_bitmask_`` (``triton.testing.do_bench``; masking the already masked logits
again: the same stores) and whether it matches the torch reference. Without CUDA (``--batch 8 --vocab 3000``)
it runs the check under the Triton interpreter and times nothing.

    python bench/structured_bitmask.py --out /tmp/bitmask.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmray.kernels import token_bitmask  # noqa: E402


def masks(rows: int, vocab: int, gen: torch.Generator, sparse_rows: int = 4) -> torch.Tensor:
    """int32 (rows, ceil(V/32)): ~3% of tokens banned per row (a JSON string's mask), the last
    ``sparse_rows`` rows allowing 16 tokens (a structural position)."""
    words = -(-vocab // 32)
    allowed = torch.rand((rows, words * 32), generator=gen) > 0.03
    allowed[-sparse_rows:] = False
    allowed[-sparse_rows:, :16] = True
    bits = (allowed.view(rows, words, 32).long() << torch.arange(32)).sum(-1)
    return (bits - (bits >= 2**31).long() * 2**32).to(torch.int32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--blocks", default="1024,2048,4096,8192")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from triton.testing import do_bench

    dev = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(1, args.batch, 2, dtype=torch.int32)
    bitmask = masks(len(rows), args.vocab, gen)
    logits = torch.randn((args.batch, args.vocab), generator=gen).to(torch.bfloat16)
    want = token_bitmask.apply_token_bitmask_torch(logits, bitmask, rows)
    dev_logits, dev_mask, dev_rows = logits.to(dev), bitmask.to(dev), rows.to(dev)
    out: dict = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "default_block": token_bitmask.BLOCK,
    }
    for block in [int(b) for b in args.blocks.split(",")]:
        x = dev_logits.clone()
        token_bitmask.apply_token_bitmask_(x, dev_mask, dev_rows, block=block)
        ok = torch.equal(x.cpu(), want)
        if CUDA:
            ms = do_bench(
                lambda b=block, t=x: token_bitmask.apply_token_bitmask_(t, dev_mask, dev_rows, block=b)
            )
            out[f"block{block}_us"] = round(ms * 1e3, 1)
        out[f"block{block}_matches_torch"] = ok
        print(block, out.get(f"block{block}_us"), ok, flush=True)
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
