"""``llmray generate``: complete one prompt with the engine and print the completion."""

from __future__ import annotations

import argparse
import sys


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with the paged-KV engine")
    p.add_argument("--model", required=True, help="Hugging Face Qwen3 model directory")
    p.add_argument("--lora", default=None, help="PEFT LoRA adapter directory applied on top of --model")
    p.add_argument("--prompt", default=None, help="prompt text (default: read from stdin)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from llmray.engine.llm import LLM
    from llmray.engine.sampling_params import SamplingParams

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        loras = {"adapter": args.lora} if args.lora else None
        llm = LLM(args.model, max_num_seqs=1, loras=loras, max_lora_rank=64, max_loras=1, max_cpu_loras=1)
        out = llm.generate([prompt], params, lora="adapter" if args.lora else None)[0]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out.text)
    return 0
