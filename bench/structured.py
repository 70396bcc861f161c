"""Structured outputs at batch scale: 256 concurrent requests on Qwen3-0.6B shapes, half of them carrying a
JSON schema, against the same batch with no schemas (``LLM.generate``, random weights, bf16).

The tokenizer is a 151,936-token byte-level BPE (trained on the Python standard library's sources by
``bench/grammar_choice.py``'s recipe; ``--tokenizer`` points at it, or at a ``.tar.xz`` of it), so masks are
computed over a vocabulary of Qwen3's size and kind. Free rows sample with ``ignore_eos`` to
``--max-tokens``; the schema keeps constrained rows going as long (an array of at least 8 strings), so both
batches hold 256 rows for the whole run and the ratio measures the cost of constraining, not shorter
answers. Runs alternate free / half / free / half ... (``--runs`` each) after a warm-up that compiles the
grammar; the JSON is rewritten after every run, so a run cut short still leaves what it measured.
Reported: output tok/s per run, ``half_schema_over_free`` (median over median, the default grammar library:
llguidance for JSON schemas), the share of constrained outputs that parse and validate (those that finished
"stop"), then, as time allows (``--budget-s``): the half batch with constrained steps synchronous
(``half_schema_over_free_sync_steps``: ``LLMEngine.defer_constrained_sampling`` off), the half batch on xgrammar
(``half_schema_over_free_xgrammar``), the all-free batch with async scheduling off (``free_sync_over_free``),
the all-free batch on the old seeded sampling path (``free_oldseed_over_free``: per-row generators instead of
the fused kernel); an extra that flips one engine setting (``_toggle``: e.g. ``prev``, the previous default)
runs as an A/B against the default half batch in the same process (``ab_<extra>_over_default``, and whether
it changed any token). ``--apply`` turns such toggles on for the whole run.

    python bench/structured.py --tokenizer .data/bpe151k.tar.xz --out bench/results/structured.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmray.config import ModelConfig  # noqa: E402
from llmray.engine.llm import LLM  # noqa: E402
from llmray.engine.sampling_params import SamplingParams  # noqa: E402
from llmray.model.qwen3 import Qwen3ForCausalLM  # noqa: E402
from llmray.model.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "rating": {"enum": ["low", "mid", "high"]},
        "notes": {"type": "array", "items": {"type": "string"}, "minItems": 8},
    },
    "required": ["title", "rating", "notes"],
    "additionalProperties": False,
}


def load_tokenizer(path: str) -> Tokenizer:
    p = Path(path)
    if p.suffix == ".xz":
        out = Path(tempfile.mkdtemp())
        with tarfile.open(p) as tar:
            tar.extractall(out, filter="data")
        p = next(out.iterdir())
    return Tokenizer.load(p)


def build_llm(tok: Tokenizer, preset: str) -> LLM:
    """Random weights of ``preset`` in memory (no checkpoint write), our tokenizer."""
    base = ModelConfig.preset(preset)
    vocab = max(base.vocab_size, tok.vocab_size)  # qwen3-0.6b: 151,936 = our tokenizer's size
    cfg = base.replace(
        vocab_size=vocab, eos_token_id=tok.eos_token_id, bos_token_id=None, max_position_embeddings=4096
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(cfg, kernels="torch")
    return LLM.from_model(model, tokenizer=tok)


def timed(llm: LLM, prompts: list, params: list) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / dt, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".data/bpe151k.tar.xz")
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warm-runs", type=int, default=1, help="uncounted full-size runs of each batch first")
    ap.add_argument(
        "--ab-runs",
        type=int,
        default=1,
        help="each half-batch extra that is a toggle (noevent, noreuse, noplan, switchN, noearly, threadsN, "
        "latesignal, latecopy, bitmaskN, hostflag, devflag, nodevwait, spincollect, prev: the previous default) "
        "runs this many times alternating with the default half batch; ab_<extra>_over_default = median over median",
    )
    ap.add_argument(
        "--budget-s", type=float, default=1e9, help="skip the optional runs past this many seconds"
    )
    ap.add_argument(
        "--extras",
        default="nodefer,xgrammar,sync",
        help="optional runs, in order: nodefer, xgrammar, sync, oldseed, noearly, noevent, nosplit, switch100, noplan, noreuse, "
        "threadsN",
    )
    ap.add_argument("--apply", default="", help="extras (toggles) on for the whole run, e.g. prev")
    ap.add_argument("--out", default="bench/results/structured.json")
    args = ap.parse_args()
    import jsonschema

    t_start = time.perf_counter()
    tok = load_tokenizer(args.tokenizer)
    llm = build_llm(tok, args.preset)
    for name in [e for e in args.apply.split(",") if e]:
        toggle = _toggle(llm, name)
        if toggle is None:
            sys.exit(f"--apply {name}: not a toggle")
        toggle[0]()
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(300, tok.vocab_size - 10, (args.prompt_len,), generator=gen).tolist()
        for _ in range(args.num)
    ]

    def params(i: int, schema: bool, backend: str = "auto") -> SamplingParams:
        kw = {"structured_output": {"json": SCHEMA, "backend": backend}} if schema else {"ignore_eos": True}
        return SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i, **kw)

    free = [params(i, False) for i in range(args.num)]
    half = [params(i, i % 2 == 1) for i in range(args.num)]
    t0 = time.perf_counter()
    w = min(8, args.num)
    llm.generate(prompts[:w], [params(i, i % 2 == 1) for i in range(w)])  # warm-up: kernels, grammar compile
    for _ in range(args.warm_runs):  # full-size runs, not counted (the first full run in a process is slow)
        timed(llm, prompts, free)
        timed(llm, prompts, half)
    warm_s = time.perf_counter() - t0
    res: dict = {"free": [], "half": []}
    result: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if args.apply:
        result["applied"] = args.apply

    outs_free: list = []

    def write(outs_half: list) -> None:
        med = {k: statistics.median(v) for k, v in res.items() if v}
        constrained = [o for i, o in enumerate(outs_half) if i % 2 == 1]
        valid = 0
        for o in constrained:
            if o.finish_reason == "stop":
                try:
                    jsonschema.validate(json.loads(o.text), SCHEMA)
                    valid += 1
                except (json.JSONDecodeError, jsonschema.ValidationError):
                    pass
        if "free" in med and "half" in med:
            result["half_schema_over_free"] = round(med["half"] / med["free"], 3)
        if "free" in med and "half_xgrammar" in med:
            result["half_schema_over_free_xgrammar"] = round(med["half_xgrammar"] / med["free"], 3)
        if "free" in med and "half_nodefer" in med:
            result["half_schema_over_free_sync_steps"] = round(med["half_nodefer"] / med["free"], 3)
        if "free_nosplit" in med and "half_nosplit" in med:  # both batches on the one-program-per-row kernel
            result["half_schema_over_free_unsplit_sampling"] = round(
                med["half_nosplit"] / med["free_nosplit"], 3
            )
        if "free_eagerdetok" in med and "half_eagerdetok" in med:  # both batches detokenizing every token
            result["half_schema_over_free_eager_detok"] = round(
                med["half_eagerdetok"] / med["free_eagerdetok"], 3
            )
        if "free" in med and "free_eagerdetok" in med:
            result["free_eager_detok_over_free"] = round(med["free_eagerdetok"] / med["free"], 3)
        if "free" in med and "free_nosplit" in med:
            result["free_unsplit_sampling_over_free"] = round(med["free_nosplit"] / med["free"], 3)
        if "free" in med and "half" in med:
            result["spread"] = {  # (max - min) / median of each batch's runs
                k: round((max(res[k]) - min(res[k])) / med[k], 3) for k in ("free", "half")
            }
        if "free" in med and "free_oldseed" in med:
            result["free_oldseed_over_free"] = round(med["free_oldseed"] / med["free"], 3)
        if "free" in med and "free_sync" in med:
            result["free_sync_over_free"] = round(med["free_sync"] / med["free"], 3)
        result.update({f"{k}_tok_s": [round(x) for x in v] for k, v in res.items()})
        devm = llm.engine.runner.masks._devm
        if devm is not None:  # device waits that gave up (the poll's limit; never, I hope)
            result["device_wait_late"] = int(devm.late[0])
        result.update(
            {
                "grammar_library": "llguidance (backend auto)",
                "constrained_finished_stop": sum(o.finish_reason == "stop" for o in constrained),
                # requests that failed (a token its mask should have excluded: the grammar rejected it)
                "constrained_errors": sum(o.finish_reason not in ("stop", "length") for o in constrained),
                # free rows of the half batch (same prompts, seeds, params) with the free batch's tokens (of
                # num/2; a decode batch of another size may round a near tie of random weights the other way)
                "free_rows_same_tokens": sum(
                    a.token_ids == b.token_ids for a, b in zip(outs_half[::2], outs_free[::2], strict=True)
                )
                if outs_free and outs_half
                else None,
                "constrained_stop_valid": valid,
                "constrained_mean_tokens": round(statistics.mean(len(o.token_ids) for o in constrained), 1)
                if constrained
                else None,
                "warmup_s": round(warm_s, 1),
                "elapsed_s": round(time.perf_counter() - t_start, 1),
                "requests": args.num,
                "prompt_len": args.prompt_len,
                "max_tokens": args.max_tokens,
                "vocab_size": tok.vocab_size,
                "schema": SCHEMA,
                "command": "python " + " ".join(sys.argv),
            }
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "schema"}), flush=True)

    outs_half: list = []
    for _ in range(args.runs):
        tps, outs_free = timed(llm, prompts, free)
        res["free"].append(tps)
        tps, outs_half = timed(llm, prompts, half)
        res["half"].append(tps)
        write(outs_half)
    per_run = (time.perf_counter() - t0 - warm_s) / (2 * args.runs)
    for extra in [e for e in args.extras.split(",") if e]:
        toggle = _toggle(llm, extra)
        need = (2 * args.ab_runs + 0.5) if toggle is not None else 2.5
        if extra == "eagerdetok":
            need = 2 * max(2, args.ab_runs) + 0.5
        if time.perf_counter() - t_start + need * per_run > args.budget_s:
            print(f"skipping {extra}: budget", flush=True)
            break
        if toggle is not None:  # A/B: the variant, then the default, N times over
            on, off = toggle
            res[f"half_{extra}"], res[f"half_{extra}_base"] = [], []
            same = True
            for _ in range(args.ab_runs):
                on()
                try:
                    tps, outs_on = timed(llm, prompts, half)
                    res[f"half_{extra}"].append(tps)
                finally:
                    off()
                tps, outs_off = timed(llm, prompts, half)
                res[f"half_{extra}_base"].append(tps)
                same = same and [o.token_ids for o in outs_on] == [o.token_ids for o in outs_off]
            a, b = statistics.median(res[f"half_{extra}"]), statistics.median(res[f"half_{extra}_base"])
            result[f"ab_{extra}_over_default"] = round(a / b, 3)
            result[f"ab_{extra}_same_tokens"] = same  # (the variant changes no token)
        elif extra == "eagerdetok":  # both batches with the read-back detokenizing every token (the old way)
            import llmray.engine.engine as engine_mod

            lazy_ok = engine_mod.IncrementalDetokenizer

            class Eager(lazy_ok):  # type: ignore[misc,valid-type]
                def __init__(self, tokenizer, prompt_ids, stop, lazy=False) -> None:
                    super().__init__(tokenizer, prompt_ids, stop, False)

            res["free_eagerdetok"], res["half_eagerdetok"] = [], []
            engine_mod.IncrementalDetokenizer = Eager
            try:
                for _ in range(max(2, args.ab_runs)):
                    res["free_eagerdetok"].append(timed(llm, prompts, free)[0])
                    res["half_eagerdetok"].append(timed(llm, prompts, half)[0])
            finally:
                engine_mod.IncrementalDetokenizer = lazy_ok
        elif extra == "nodefer":
            llm.engine.defer_constrained_sampling = False
            res["half_nodefer"] = [timed(llm, prompts, half)[0]]
            llm.engine.defer_constrained_sampling = True
        elif (
            extra == "oldseed"
        ):  # the free batch with seeded rows on per-row generators (the old sampler path)
            llm.engine.runner.sampler.fused_seeded = False
            res["free_oldseed"] = [timed(llm, prompts, free)[0]]
            llm.engine.runner.sampler.fused_seeded = True
        elif extra == "nosplit":  # the sampling kernel on one program per row (both batches, alternating)
            import llmray.kernels.sampling as sampling_kernel

            default_programs, sampling_kernel.TARGET_PROGRAMS = sampling_kernel.TARGET_PROGRAMS, 0
            res["free_nosplit"], res["half_nosplit"] = [], []
            for _ in range(2):
                res["free_nosplit"].append(timed(llm, prompts, free)[0])
                res["half_nosplit"].append(timed(llm, prompts, half)[0])
            sampling_kernel.TARGET_PROGRAMS = default_programs
        elif extra == "sync":
            llm.engine.async_scheduling = False
            res["free_sync"] = [timed(llm, prompts, free)[0]]
            llm.engine.async_scheduling = True
        elif extra == "xgrammar":
            hx = [params(i, i % 2 == 1, "xgrammar") for i in range(args.num)]
            llm.generate(prompts[:w], hx[:w])  # compile
            res["half_xgrammar"] = [timed(llm, prompts, hx)[0]]
        write(outs_half)


def _toggle(llm: LLM, extra: str):
    """(turn the variant on, turn it off) for the half-batch extras that flip one engine setting, else None."""
    runner = llm.engine.runner
    if extra in ("noevent", "noreuse", "noearly", "noside", "spincollect", "latesignal", "latecopy"):
        attr = {
            "noevent": "from_event",
            "noreuse": "reuse",
            "noearly": "early",
            "noside": "side_copy",
            "latesignal": "early_signal",  # the host flag stored after the worker's checks (the older order)
            "latecopy": "copy_at_start",  # the host flag's poll and the copy queued at sampling (older order)
        }.get(extra, "sleep_collect")
        return (lambda: setattr(runner.masks, attr, False)), (lambda: setattr(runner.masks, attr, True))
    if extra in ("devwait", "nodevwait", "devflag", "hostflag"):
        # the device waits for the worker's masks (devwait: by the default flag; devflag: a device flag the
        # worker's copy sets; hostflag: a host flag the worker stores) / the host waits for the worker
        masks = runner.masks
        default = (masks.device_wait, masks.host_flag)
        if torch.cuda.is_available():  # its wait kernel compiled now, not inside a timed run
            from llmray.kernels.token_bitmask import wait_flag

            one = torch.ones(1, dtype=torch.int32, device="cuda")
            try:
                wait_flag(one, 0, torch.zeros_like(one))
            except Exception as e:
                print("wait_flag failed:", repr(e), flush=True)
                return None
        want = (extra != "nodevwait", {"devflag": False, "hostflag": True}.get(extra, default[1]))
        return (lambda: (setattr(masks, "device_wait", want[0]), setattr(masks, "host_flag", want[1]))), (
            lambda: (setattr(masks, "device_wait", default[0]), setattr(masks, "host_flag", default[1]))
        )
    if extra == "noplan":
        return (lambda: setattr(runner.sampler, "plan_ahead", False)), (
            lambda: setattr(runner.sampler, "plan_ahead", True)
        )
    if extra.startswith("switch"):  # the GIL switch interval while a fill runs: switchN = N us
        import llmray.engine.structured.step_masks as step_masks

        default, value = step_masks._SWITCH_S, int(extra[6:]) * 1e-6
        return (lambda: setattr(step_masks, "_SWITCH_S", value)), (
            lambda: setattr(step_masks, "_SWITCH_S", default)
        )
    if extra == "prev":  # the seventh session's default: flag after the checks, copy queued at sampling,
        # GIL switch 20 us, mask kernel block 2048
        toggles = [_toggle(llm, e) for e in ("latesignal", "latecopy", "switch20", "bitmask2048")]
        return (lambda: [t[0]() for t in toggles if t]), (lambda: [t[1]() for t in toggles if t])
    if extra.startswith("bitmask"):  # the mask kernel's block (tokens per program): bitmaskN
        import llmray.kernels.token_bitmask as token_bitmask

        default_block, block = token_bitmask.BLOCK, int(extra[7:])
        if torch.cuda.is_available():  # compiled now (both dtypes, selected rows), not inside a timed run
            words, rows = (
                torch.ones((2, 4748), dtype=torch.int32, device="cuda"),
                torch.arange(2, device="cuda"),
            )
            for dt in (torch.float32, torch.bfloat16):
                x = torch.zeros((4, 151936), dtype=dt, device="cuda")
                token_bitmask.apply_token_bitmask_(x, words, rows.to(torch.int32), block=block)
        return (lambda: setattr(token_bitmask, "BLOCK", block)), (
            lambda: setattr(token_bitmask, "BLOCK", default_block)
        )
    if extra.startswith("threads"):
        import llguidance

        llg = llm.engine._grammars.backend("llguidance")
        default_executor, executor = llg.executor, llguidance.LLExecutor(int(extra[7:]))
        return (lambda: setattr(llg, "executor", executor)), (
            lambda: setattr(llg, "executor", default_executor)
        )
    return None


if __name__ == "__main__":
    main()
