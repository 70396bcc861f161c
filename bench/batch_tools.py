"""Helpers of bench/batch.py: the model directory, GPU memory, Ray (re)start, py-spy recordings."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/llmray_bench_batch")
VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")


def shared_text() -> Path:
    root = Path(os.environ.get("LLMRAY_SHARED_DATA", REPO.parent / "shared" / "data"))
    for path in (root / "tinyshakespeare" / "input.txt", REPO / ".data" / "tinyshakespeare" / "input.txt"):
        if path.exists():
            return path
    raise SystemExit(f"no tinyshakespeare/input.txt under {root} or .data/ (set LLMRAY_SHARED_DATA)")


def make_model_dir(quick: bool, tokenizer_dir: Path, text: str) -> Path:
    """Random-weight Qwen3 directory: 0.6B shapes + the BPE tokenizer, or (quick) tiny + a char tokenizer."""
    from llmray.config import ModelConfig
    from llmray.model.checkpoint import save_model
    from llmray.model.qwen3 import Qwen3ForCausalLM
    from llmray.model.tokenizer import Tokenizer, char_tokenizer

    if quick:
        cfg = ModelConfig.preset("tiny", max_position_embeddings=4096)
        tok = char_tokenizer(text)
    else:
        cfg = ModelConfig.preset("qwen3-0.6b")
        tok = Tokenizer.load(tokenizer_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise SystemExit(f"tokenizer {tokenizer_dir} has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    out = WORK / ("tiny-char" if quick else "qwen3-0.6b-bpe151k")
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = Qwen3ForCausalLM(cfg)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    save_model(model.to(dtype), out, tokenizer=tok, dtype=dtype)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def py_spy(binary: str | None, pid: int, path: Path, seconds: float, delay: float = 0.0) -> None:
    """Record ``pid`` for ``seconds`` (after ``delay``), in the background, as raw stacks per thread: into
    ``path`` the threads on a CPU (a thread waiting for the GIL is not), into ``path``-gil.txt the thread
    holding the GIL. Nothing when ``binary`` is None."""
    if not binary:
        return

    def run(extra: list[str], dest: str) -> None:
        time.sleep(delay)
        cmd = [binary, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200"]
        cmd += ["--nonblocking", "--threads", "--format", "raw", "-o", dest, *extra]
        with open(dest + ".log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)

    for extra, dest in (([], str(path)), (["--gil"], str(path)[: -len(".txt")] + "-gil.txt")):
        threading.Thread(target=run, args=(extra, dest), daemon=True).start()


def gpu_memory_used() -> list[int]:
    """MiB in use on each GPU (nvidia-smi; empty when it cannot tell)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return [int(x) for x in out.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return []


def wait_gpus_free(baseline: list[int], which: list[int] | None = None, limit_s: float = 20.0) -> float:
    """Wait until the GPUs in ``which`` (default all) are back within 1 GiB of ``baseline`` (the last run's
    engines have exited)."""
    t = time.perf_counter()
    while time.perf_counter() - t < limit_s:
        used = gpu_memory_used()
        idx = which if which is not None else range(len(baseline))
        if len(used) != len(baseline) or all(used[i] <= baseline[i] + 1024 for i in idx):
            break
        time.sleep(0.5)
    return time.perf_counter() - t


def watch_engines(stats_dir: Path, args, tag: str, stop: threading.Event) -> None:
    """py-spy each engine process of a run once its stats file appears (engine up)."""
    if not args.py_spy:
        return

    def run() -> None:
        seen: set[str] = set()
        while not stop.is_set():
            for f in stats_dir.glob("engine-*.json"):
                pid = f.stem.split("-")[1]
                if pid not in seen:
                    seen.add(pid)
                    out = Path(args.out) / f"pyspy-{tag}-{pid}.txt"
                    py_spy(args.py_spy, int(pid), out, args.py_spy_s, delay=args.py_spy_delay)
            stop.wait(0.2)

    threading.Thread(target=run, daemon=True).start()


def start_ray(gpus: str | None) -> float:
    """(Re)start a local Ray that sees the GPUs in ``gpus`` (a CUDA_VISIBLE_DEVICES value; None: as given)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if gpus is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        if VISIBLE is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = VISIBLE
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    t = time.perf_counter()
    for attempt in range(3):  # an overloaded host can miss Ray's fixed 30 s raylet start-up wait
        try:
            ray.init(configure_logging=False, log_to_driver=False, include_dashboard=False)
            break
        except Exception as e:
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()
    return time.perf_counter() - t
