"""CPU cost of the OpenAI app per streamed request, in-process (no sockets, no Ray): ``build_openai_app`` over
a backend that yields ``--events`` token events at once, driven by ASGI calls; prints CPU µs per request
(``time.process_time``, so a busy machine inflates it less than wall time).

    python bench/serve_ingress_cpu.py --events 8
    python bench/serve_ingress_cpu.py --src /tmp/old-tree    # an older llmray (git archive) side by side
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument(
        "--src", default=str(Path(__file__).resolve().parents[1]), help="the llmray tree to import"
    )
    a = ap.parse_args()
    sys.path.insert(0, a.src)
    from llmray.serve.ingress import IngressConfig, build_openai_app

    class Backend:
        async def stream(self, kind, body, arrival, adapter=None, request_id=None):  # noqa: ANN001, ANN202
            for i in range(a.events):
                yield [{"index": 0, "text": "abcdefghijklmnop", "num_tokens": 16, "prompt_tokens": 128,
                        "finish_reason": "length" if i == a.events - 1 else None,
                        "completion_tokens": 16 * (i + 1), "logprobs": None}]  # fmt: skip

    app = build_openai_app(Backend(), IngressConfig("bench"))
    body = json.dumps({"model": "bench", "prompt": list(range(128)), "max_tokens": 128, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()  # fmt: skip
    headers = [
        (b"host", b"x"),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]

    async def one() -> list[dict]:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 2)}  # fmt: skip
        done, sent, out = asyncio.Event(), [], []

        async def receive() -> dict:
            if not sent:
                sent.append(1)
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(m: dict) -> None:
            out.append(m)
            if m["type"] == "http.response.body" and not m.get("more_body"):
                done.set()

        await app(scope, receive, send)
        return out

    async def run() -> None:
        first = await one()
        assert first[0]["status"] == 200, first
        for _ in range(3):
            t = time.process_time()
            for _ in range(a.requests):
                await one()
            print(
                f"{(time.process_time() - t) / a.requests * 1e6:.0f} us CPU per request ({a.events} events)"
            )

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
