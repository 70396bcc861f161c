"""An engine double that answers with a scripted text: the serve layer's output parsing (tool calls, thinking)
tested on exact model outputs. ``LLMServer(engine_factory="_support.scripted_engine:ScriptedAsyncLLM")``.

The answer is ``SCRIPTS[key]`` for the first key found in the prompt (else ``"ok"``), one character per token
(the mock engine's char tokenizer), finishing "stop" (or "length" at ``max_tokens``).
"""

from __future__ import annotations

from _support.mock_engine import MockAsyncLLM, MockRequestOutput

SCRIPTS = {
    "[think]": "<think>\nTwo and two make four.\n</think>\n\nThe answer is 4.",
    "[tool]": (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
    ),
    "[think+tool]": (
        "<think>\nI need the weather.\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    ),
}


class ScriptedAsyncLLM(MockAsyncLLM):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("token_delay_s", 0.0)
        super().__init__(*args, **kwargs)

    async def _tokens(self, prompt, sampling_params, request_id=None, lora=None):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        script = next((v for k, v in sorted(SCRIPTS.items(), key=lambda kv: -len(kv[0])) if k in text), "ok")
        out_ids: list[int] = []
        for i, ch in enumerate(script):
            out_ids += self.tokenizer.encode(ch)
            last = i == len(script) - 1
            finish = "stop" if last else ("length" if len(out_ids) >= sampling_params.max_tokens else None)
            yield MockRequestOutput(
                request_id or "r", ids, list(out_ids), script[: i + 1], finish, None, 0, out_ids[-1:], ch
            )
            if finish:
                return
