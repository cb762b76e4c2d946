"""The server's Prometheus metrics (prometheus-client), in a registry of its own: requests by outcome, prompt
and generated tokens, the running batch and the queue, prefix-cache hits, time to first token and the time
between tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..generation.engine import Engine

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dh_mlx_requests", "Requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("dh_mlx_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dh_mlx_generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("dh_mlx_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache",
                                     registry=r)
        Gauge("dh_mlx_running_requests", "Requests in the running batch (decoding or prefilling)",
              registry=r).set_function(lambda: engine.running)
        Gauge("dh_mlx_queue_depth", "Requests waiting to be admitted", registry=r).set_function(
            lambda: engine.queue_depth)
        self.ttft = Histogram("dh_mlx_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("dh_mlx_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=_LATENCY, registry=r)

    def finished(self, outcome: str, usage) -> None:
        self.requests.labels(outcome=outcome).inc()
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.generation_tokens.inc(usage.completion_tokens)
            self.cached_tokens.inc(usage.cached_tokens)

    def text(self) -> bytes:
        return generate_latest(self.registry)
