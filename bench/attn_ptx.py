"""The paged-attention kernels compiled for an H200 (sm_90) on any machine: PTX and SASS against another tree.

    git archive REV llmray | tar -x -C /tmp/base && python bench/attn_ptx.py --base /tmp/base [--out DIR]

For changes that must not change the generated code (a shared @triton.jit helper is inlined): each variant, the
engine's launch configs (decode bf16 / fp8 defaults, a split-K and a prefetch decode, the per-head prefill cold /
tiled / tiled split-K, the split prefill "wide" / "narrow" / peeled first step), is compiled by Triton's own
pipeline with one signature in both trees (no GPU needed: ptxas and nvdisasm ship with Triton's NVIDIA backend;
strides are plain i32, so the code is close to, not exactly, a real launch's). Per variant: whether the PTX code
(debug sections dropped) and the SASS (addresses dropped) are the same, and their instruction counts. Each tree
compiles in its own process (``--dump DIR``, the worker), without line info (ptxas schedules by it: the same code
at other source lines gave other register numbers); ``sass_opcodes_same`` compares the instruction multisets.
``--out`` writes attn_ptx.json.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

I32, F32, BF, E4 = "*i32", "*fp32", "*bf16", "*fp8e4nv"
COMMON = dict(H=16, GROUP=2, D=128, BLOCK_D=128, PAGE=16, PRECISION="tf32")
DECODE_PTRS = dict(q_ptr=BF, k_cache_ptr=BF, v_cache_ptr=BF, block_tables_ptr=I32, context_lens_ptr=I32,
                   query_start_ptr=I32, k_scale_ptr=I32, v_scale_ptr=I32, out_ptr=BF, part_out_ptr=F32,
                   part_lse_ptr=F32)  # fmt: skip
FP8_PTRS = dict(k_cache_ptr=E4, v_cache_ptr=E4, k_scale_ptr=F32, v_scale_ptr=F32)
PREFILL_PTRS = dict(q_ptr=BF, k_cache_ptr=BF, v_cache_ptr=BF, block_tables_ptr=I32, query_start_ptr=I32,
                    context_lens_ptr=I32, tile_seq_ptr=I32, tile_m_ptr=I32, k_scale_ptr=I32, v_scale_ptr=I32,
                    out_ptr=BF, part_out_ptr=F32, part_lse_ptr=F32)  # fmt: skip
SPLIT_PTRS = {**PREFILL_PTRS, "part_out_ptr": BF, "ticket_ptr": I32, "times_ptr": I32}
_SPLIT = dict(HKV=8, BLOCK_M=64, MERGE_ONLINE=False, FP8=False, I64=False, PDL=True, TIMES=False)
# name -> (module, kernel, pointer types, constexprs (CDT by name), num_warps, num_stages)
VARIANTS = {
    "decode_bf16": ("_paged_attention_kernels", "_decode_kernel", DECODE_PTRS, dict(
        BLOCK_G=16, BLOCK_N=64, NUM_SPLITS=1, INDIRECT=True, FP8=False, CDT="bfloat16", HEADS_FAST=True,
        FAST_ADDR=True, I64=False), 2, 5),
    "decode_fp8": ("_paged_attention_kernels", "_decode_kernel", {**DECODE_PTRS, **FP8_PTRS}, dict(
        BLOCK_G=8, BLOCK_N=64, NUM_SPLITS=2, INDIRECT=True, FP8=True, CDT="float16", HEADS_FAST=True,
        V_SCALE_FIRST=True, TRANS=True, V_ASM=True, FAST_ADDR=True, I64=False), 2, 5),
    "decode_bf16_split8": ("_paged_attention_kernels", "_decode_kernel", DECODE_PTRS, dict(
        BLOCK_G=16, BLOCK_N=64, NUM_SPLITS=8, INDIRECT=True, FP8=False, CDT="bfloat16"), 4, 5),
    "decode_prefetch": ("_paged_attention_kernels", "_decode_kernel", DECODE_PTRS, dict(
        BLOCK_G=16, BLOCK_N=64, NUM_SPLITS=1, INDIRECT=True, FP8=False, CDT="bfloat16", PREFETCH=True), 4, 3),
    "prefill_cold": ("_paged_prefill_kernels", "_prefill_kernel", PREFILL_PTRS, dict(
        BLOCK_M=64, BLOCK_N=64, NUM_SPLITS=1, TILED=False, FP8=False, CDT="bfloat16"), 4, 2),
    "prefill_tiled": ("_paged_prefill_kernels", "_prefill_kernel", PREFILL_PTRS, dict(
        BLOCK_M=64, BLOCK_N=64, NUM_SPLITS=1, TILED=True, FP8=False, CDT="bfloat16"), 4, 2),
    "prefill_tiled_split8": ("_paged_prefill_kernels", "_prefill_kernel", PREFILL_PTRS, dict(
        BLOCK_M=64, BLOCK_N=64, NUM_SPLITS=8, TILED=True, FP8=False, CDT="bfloat16"), 4, 2),
    "split_wide": ("_prefill_split_kernel", "_prefill_split_kernel", SPLIT_PTRS, dict(
        _SPLIT, NUM_SPLITS=16, BLOCK_R=128, BLOCK_N=64, BLOCK_S=16, MERGE_C=4, SEP_MERGE=True, TRIGGER=True,
        CDT="bfloat16", PRELOAD=False), 8, 3),
    "split_narrow": ("_prefill_split_kernel", "_prefill_split_kernel", SPLIT_PTRS, dict(
        _SPLIT, NUM_SPLITS=8, BLOCK_R=16, BLOCK_N=128, BLOCK_S=8, MERGE_C=8, SEP_MERGE=False, TRIGGER=False,
        CDT="bfloat16", PRELOAD=False), 4, 3),
    "split_preload": ("_prefill_split_kernel", "_prefill_split_kernel", SPLIT_PTRS, dict(
        _SPLIT, NUM_SPLITS=8, BLOCK_R=16, BLOCK_N=128, BLOCK_S=8, MERGE_C=8, SEP_MERGE=False, TRIGGER=False,
        CDT="bfloat16", PRELOAD=True), 4, 3),
}  # fmt: skip


def dump(out: Path) -> None:
    """(worker) Compile every variant from the llmray on sys.path; write NAME.ptx and NAME.cubin into ``out``."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import llmray

    (out / "origin.txt").write_text(str(Path(llmray.__file__).parent))
    for name, (mod, kern, ptrs, consts, warps, stages) in VARIANTS.items():
        fn = getattr(importlib.import_module(f"llmray.kernels.{mod}"), kern)
        consts = {k: getattr(tl, v) if k == "CDT" else v for k, v in {**COMMON, **consts}.items()}
        sig: dict[str, str] = {}
        for p, par in inspect.signature(fn.fn).parameters.items():
            if p in consts or par.default is not inspect.Parameter.empty:
                sig[p] = "constexpr"
                consts.setdefault(p, par.default)
            else:
                sig[p] = ptrs.get(p, "fp32" if p == "qk_scale" else "i32")
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        k = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
        )
        (out / f"{name}.ptx").write_text(k.asm["ptx"])
        (out / f"{name}.cubin").write_bytes(k.asm["cubin"])


def _code(ptx: str) -> list[str]:
    """PTX instructions and declarations, without the debug sections, line labels and comments."""
    body = ptx.split(".section\t.debug", 1)[0].split(".section .debug", 1)[0]
    return [ln.split("//")[0].rstrip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith((".loc", ".file", "//", "$L__tmp"))]  # fmt: skip


def _sass(cubin: Path) -> list[str]:
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    text = subprocess.run(
        [str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    lines = [re.sub(r"/\*[0-9a-f]+\*/", "", ln).strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(("//", "."))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a directory holding the other tree's llmray package")
    ap.add_argument("--label", help="what the base tree is (e.g. its commit), for the JSON")
    ap.add_argument("--out", help="write attn_ptx.json here")
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.dump:
        dump(Path(a.dump))
        return
    if not a.base:
        ap.error("--base DIR is needed (the tree to compare with)")
    here = str(Path(__file__).resolve().parents[1])
    import triton

    res: dict = {"device": "none: compiled for sm_90, not run", "triton": triton.__version__, "base": a.label or a.base,
                 "command": "python bench/attn_ptx.py " + " ".join(sys.argv[1:]), "variants": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for tag, root in (("base", a.base), ("this", here)):
            Path(tmp, tag).mkdir()
            env = {**os.environ, "PYTHONPATH": root, "TRITON_INTERPRET": "0", "TRITON_DISABLE_LINE_INFO": "1"}
            subprocess.run(
                [sys.executable, __file__, "--dump", str(Path(tmp, tag))], env=env, check=True, cwd=tmp
            )
            res[f"{tag}_llmray"] = Path(tmp, tag, "origin.txt").read_text()
            print(tag, "tree:", res[f"{tag}_llmray"], flush=True)
        for name in VARIANTS:
            ptx = [_code(Path(tmp, t, f"{name}.ptx").read_text()) for t in ("base", "this")]
            sass = [_sass(Path(tmp, t, f"{name}.cubin")) for t in ("base", "this")]
            ops = [
                sorted(ln.split()[0] if not ln.startswith("@") else ln.split()[1] for ln in x) for x in sass
            ]
            row = {"ptx_same": ptx[0] == ptx[1], "sass_same": sass[0] == sass[1], "sass_opcodes_same": ops[0] == ops[1],
                   "sass_instructions": [len(s) for s in sass],
                   "ptx_sha1": [hashlib.sha1("\n".join(p).encode()).hexdigest()[:10] for p in ptx]}  # fmt: skip
            res["variants"][name] = row
            print(name, json.dumps(row), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "attn_ptx.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
