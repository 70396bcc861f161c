"""Engine and request metrics through ``ray.serve.metrics`` (Ray dashboard, Prometheus via Ray's export).

Names follow vLLM's without the colon; Ray's exporter prefixes ``ray_``, so Prometheus sees e.g.
``ray_llmray_time_to_first_token_seconds_bucket``. Serve adds deployment/replica/application tags; we add
``model_name``: the histograms (per request; a histogram's ``_count`` counts requests) carry the name the
request asked for, an adapter's own for an adapter request; engine-wide gauges and counters carry the base
model's. Gauges and the engine-side counters (prefix-cache hits) are refreshed from
``AsyncLLM.stats()`` by the LLMServer's poll loop (token and prefix-hit counters too, as deltas);
per-request histograms are observed once per finished request (the inter-token latency as the request's
mean, vLLM's time per output token): one observation per stream chunk cost more CPU than the chunk.
"""

from __future__ import annotations

from typing import Any

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5]
E2E_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
QUEUE_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

METRIC_NAMES = (
    "llmray_time_to_first_token_seconds",
    "llmray_inter_token_latency_seconds",
    "llmray_e2e_request_latency_seconds",
    "llmray_request_queue_time_seconds",
    "llmray_num_requests_running",
    "llmray_num_requests_waiting",
    "llmray_kv_cache_usage_perc",
    "llmray_prefix_cache_hits_total",
    "llmray_prompt_tokens_total",
    "llmray_generation_tokens_total",
)


class ServeMetrics:
    """The llmray metric set for one LLMServer replica (no-op when ``enabled`` is False)."""

    def __init__(self, model_name: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self._tags = {"model_name": model_name}
        self._last: dict[str, int] = {}  # engine counters at the previous poll
        if not enabled:
            return
        from ray.serve import metrics as m

        keys = ("model_name",)

        def hist(name: str, desc: str, buckets: list[float]) -> Any:
            h = m.Histogram(name, description=desc, boundaries=buckets, tag_keys=keys)
            h.set_default_tags(dict(self._tags))  # serve mutates the dict
            return h

        def counter(name: str, desc: str) -> Any:
            c = m.Counter(name, description=desc, tag_keys=keys)
            c.set_default_tags(dict(self._tags))  # serve mutates the dict
            return c

        def gauge(name: str, desc: str) -> Any:
            g = m.Gauge(name, description=desc, tag_keys=keys)
            g.set_default_tags(dict(self._tags))  # serve mutates the dict
            return g

        self.ttft = hist("llmray_time_to_first_token_seconds", "Time to first token (s)", TTFT_BUCKETS)
        self.itl = hist("llmray_inter_token_latency_seconds", "Time between output tokens (s)", ITL_BUCKETS)
        self.e2e = hist("llmray_e2e_request_latency_seconds", "Request latency, end to end (s)", E2E_BUCKETS)
        self.queue = hist(
            "llmray_request_queue_time_seconds", "Ingress arrival to LLMServer start (s)", QUEUE_BUCKETS
        )
        self.running = gauge("llmray_num_requests_running", "Requests in the engine's running batch")
        self.waiting = gauge("llmray_num_requests_waiting", "Requests waiting in the engine's queue")
        self.kv_usage = gauge("llmray_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)")
        self.prefix_hits = counter(
            "llmray_prefix_cache_hits_total",
            "Prompt tokens served from the prefix cache (as vLLM counts hits)",
        )
        self.prompt_tokens = counter("llmray_prompt_tokens_total", "Prompt tokens processed")
        self.gen_tokens = counter("llmray_generation_tokens_total", "Tokens generated")

    def _tags_for(self, model: str | None) -> dict[str, str] | None:
        """Per-request tags: the adapter's name for an adapter request (None: the base model's defaults)."""
        return None if model is None else {"model_name": model}

    # --- per request ------------------------------------------------------------------------------
    # ``model``: the adapter a request asked for (None: the base model)
    def observe_queue(self, seconds: float, model: str | None = None) -> None:
        if self.enabled:
            self.queue.observe(max(seconds, 0.0), tags=self._tags_for(model))

    def observe_request(
        self, start: float, first: float | None, end: float, tokens: int, model: str | None = None
    ) -> None:
        """A finished request (times from ``time.time()``): its TTFT, its mean inter-token latency and its
        end-to-end latency, one observation each (per chunk, Ray's metric calls cost a replica at high
        concurrency more than the rest of the stream does)."""
        if not self.enabled:
            return
        tags = self._tags_for(model)
        if first is not None:
            self.ttft.observe(first - start, tags=tags)
            if tokens > 1:
                self.itl.observe((end - first) / (tokens - 1), tags=tags)
        self.e2e.observe(end - start, tags=tags)

    # --- engine state -----------------------------------------------------------------------------
    def update_from_stats(self, stats: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.running.set(stats.get("num_running", 0))
        self.waiting.set(stats.get("num_waiting", 0))
        self.kv_usage.set(stats.get("kv_cache_usage", 0.0))
        # engine-wide counters: add what grew since the last poll (keeps per-token work off the hot path)
        for counter, key in (
            (self.prefix_hits, "prefix_cache_hits"),
            (self.prompt_tokens, "prompt_tokens_total"),
            (self.gen_tokens, "generation_tokens_total"),
        ):
            value = int(stats.get(key, 0))
            grown = value - self._last.get(key, 0)
            if grown > 0:
                counter.inc(grown)
            self._last[key] = value
