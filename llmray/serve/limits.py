"""Every limit the serving path enforces, in one place (the request schemas, the ingress and errors use these)."""

from __future__ import annotations

MAX_N = 16  # choices per request; each is one engine request
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs / logprobs
MAX_PROMPTS = 128  # prompts in one batched /v1/completions request (each x n is an engine request)
MAX_STOP = 16  # stop strings per request (OpenAI allows 4); each is searched after every token
MAX_STOP_CHARS = 256  # characters per stop string (the stream holds back that much text)
MAX_STOP_TOKEN_IDS = 64
MAX_INT32 = 2**31 - 1  # bound for integers the engine puts into int tensors (top_k, token ids)
MAX_SEED = 2**63 - 1
MAX_BODY_BYTES = 4 * 1024 * 1024  # request bodies (413 beyond; ServeArgs.max_body_bytes overrides)
MAX_MESSAGE_CHARS = 1024  # an error message never grows with the input that caused it
MAX_ECHO_CHARS = 80  # the most of a client's own value that a message quotes back
MAX_REQUEST_ID_CHARS = 128  # X-Request-Id values longer than this are replaced by one of ours
