"""HF transformers ``generate`` on a subset of the workload, for bench/engine_baselines.py.

``run_hf`` starts ``engine_baselines.py --hf MODE`` in a subprocess bounded by a timeout; that process runs
``hf_child``: dynamic cache, or static cache + compile (warmed up on the same shapes), left-padded prompts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from engine_common import model_config, sync, workload


def hf_child(args) -> None:
    """Runs in a subprocess (bounded by a timeout): HF transformers generate on the subset."""
    from transformers import Qwen3Config
    from transformers import Qwen3ForCausalLM as HFQwen3

    from llmray.model.checkpoint import hf_config_dict

    cfg = model_config(args.quick)
    hf_cfg = Qwen3Config(
        **{k: v for k, v in hf_config_dict(cfg, torch.bfloat16).items() if k != "torch_dtype"}
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = HFQwen3(hf_cfg).to(dtype).eval()
    prompts, outs = subset(args, cfg)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    new = max(outs)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    if args.hf == "static":
        kw["cache_implementation"] = "static"
        warm = dict(kw)  # same shapes as the timed run, so compilation happens here
    else:
        warm = dict(kw, max_new_tokens=2, min_new_tokens=2)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, **warm)
        sync()
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, **kw)
        sync()
        dt = time.perf_counter() - t
    Path(args.hf_out).write_text(
        json.dumps({"seconds": dt, "requested_tokens": sum(outs), "tok_per_s": sum(outs) / dt})
    )


def subset(args, cfg):
    prompts, outs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    n = args.hf_seqs
    return prompts[:n], [min(o, args.hf_max_new) for o in outs[:n]]


def run_hf(args, mode: str, timeout: int) -> dict:
    out = Path(args.out) / f"_hf_{mode}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("engine_baselines.py")),
        "--hf",
        mode,
        "--hf-out",
        str(out),
        "--num-seqs",
        str(args.num_seqs),
    ]
    cmd += ["--min-len", str(args.min_len), "--max-len", str(args.max_len), "--hf-seqs", str(args.hf_seqs)]
    cmd += ["--hf-max-new", str(args.hf_max_new)] + (["--quick"] if args.quick else [])
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout} s (time bound of this bench)"}
    if proc.returncode != 0 or not out.exists():
        return {"error": proc.stderr[-2000:]}
    return json.loads(out.read_text())
