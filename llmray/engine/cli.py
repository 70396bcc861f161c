"""``llmray generate``: complete one prompt with the engine and print the completion.

The model directory, adapter and prompt are checked before the engine loads: a missing directory, a
non-positive ``--max-tokens`` or a prompt character a char tokenizer lacks is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def lora_pair(text: str) -> tuple[str, str]:
    """``--lora NAME=DIR`` as ``(name, dir)``: the argparse ``type`` of ``llmray serve`` and ``llmray batch``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora expects NAME=DIR, got {text!r}")
    return name, path


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with the paged-KV engine")
    p.add_argument("--model", required=True, help="Hugging Face Qwen3 model directory")
    p.add_argument("--lora", default=None, help="PEFT LoRA adapter directory applied on top of --model")
    p.add_argument("--prompt", default=None, help="prompt text (default: read from stdin)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.set_defaults(func=run_generate)


def _check(args: argparse.Namespace, prompt: str, where: str) -> None:
    """Refuse bad input before the engine loads (ValueError / FileNotFoundError naming the flag)."""
    from llmray.model.checkpoint import load_config
    from llmray.model.tokenizer import Tokenizer, describe_chars

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    load_config(args.model)  # names a missing or foreign --model
    if args.lora is not None and not (Path(args.lora) / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"--lora {args.lora}: no adapter_config.json there (a PEFT adapter directory)"
        )
    tok = Tokenizer.load(args.model)
    for n, line in enumerate(prompt.splitlines() or [""], 1):
        unknown = tok.unknown_chars(line)
        if unknown:
            raise ValueError(
                f"{where}:{n}: characters the tokenizer of {args.model} cannot encode: {describe_chars(unknown)} "
                "(a char vocabulary holds printable ASCII and the characters of its training corpus)"
            )


def run_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    where = "--prompt" if args.prompt is not None else "<stdin>"
    args.model = os.path.abspath(os.path.expanduser(args.model))
    if args.lora is not None:
        args.lora = os.path.abspath(os.path.expanduser(args.lora))
    try:
        _check(args, prompt, where)
        from llmray.engine.llm import LLM
        from llmray.engine.sampling_params import SamplingParams

        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        loras = {"adapter": args.lora} if args.lora else None
        llm = LLM(args.model, max_num_seqs=1, loras=loras, max_lora_rank=64, max_loras=1, max_cpu_loras=1)
        out = llm.generate([prompt], params, lora="adapter" if args.lora else None)[0]
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("LLMRAY_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out.text)
    return 0
