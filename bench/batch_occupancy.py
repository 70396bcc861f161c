"""The two batch-actor designs on one in-process engine (tiny model, CPU), counted in engine steps (no timing
noise): one continuous feed over all rows (the streaming actor) against ``generate_stream`` over one batch at
a time (the synchronous actor, which drains at every batch's tail).

    python bench/batch_occupancy.py --out bench/results      # writes batch_occupancy_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))]
        params = {"max_tokens": rng.randint(lo, hi), "temperature": 0.6, "ignore_eos": True}
        rows.append({"id": i, "prompt_token_ids": prompt, "sampling_params": params})
    return rows


def occupancy(args) -> dict:
    """The two actor designs on one in-process engine (tiny model, CPU), counted in engine steps (no timing
    noise): one continuous feed over all rows (the streaming actor) against ``generate_stream`` over one
    batch at a time (the synchronous actor, which drains at every batch's tail)."""
    from llmray.config import ModelConfig
    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams
    from llmray.model.qwen3 import Qwen3ForCausalLM

    cfg = ModelConfig.preset("tiny", max_position_embeddings=4096)
    torch.manual_seed(0)
    seqs = args.occ_seqs
    llm = LLM.from_model(Qwen3ForCausalLM(cfg, kernels="torch"), kernels="torch", max_num_seqs=seqs)
    rows = workload(args.occ_rows, 4, args.occ_max_len, cfg.vocab_size)
    reqs = [(r["id"], r["prompt_token_ids"], SamplingParams(**r["sampling_params"])) for r in rows]
    counts = {"steps": 0, "seqs": 0}
    step = llm.engine.step

    def counted():
        counts["steps"] += 1
        counts["seqs"] += len(llm.engine.scheduler.running)
        return step()

    llm.engine.step = counted
    res = {
        "rows": len(rows),
        "max_num_seqs": seqs,
        "prompt_and_output_lengths": f"uniform in [4, {args.occ_max_len}]",
    }
    sizes = [(f"sync_batch_{b}", b) for b in (seqs, 4 * seqs)]
    for name, size in [("streaming", len(reqs)), *sizes]:
        counts.update(steps=0, seqs=0)
        t = time.perf_counter()
        for i in range(0, len(reqs), size):
            for _ in llm.generate_stream(reqs[i : i + size]):
                pass
        res[name] = dict(
            engine_steps=counts["steps"],
            mean_running_seqs=counts["seqs"] / counts["steps"],
            seconds=time.perf_counter() - t,
        )
        print(name, res[name], flush=True)
    for name, _ in sizes:
        res[f"{name}_steps_over_streaming"] = res[name]["engine_steps"] / res["streaming"]["engine_steps"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--occ-rows", type=int, default=256)
    ap.add_argument("--occ-seqs", type=int, default=32)
    ap.add_argument("--occ-max-len", type=int, default=48)
    args = ap.parse_args()
    res = {"command": "python " + " ".join(sys.argv), "device": "cpu", **occupancy(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_occupancy_cpu.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
