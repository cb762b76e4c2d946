"""`dh-mlx serve`: an OpenAI-compatible server over the batched engine (docs/serving.md).

`serve()` loads the model, starts the engine's loop in a thread and runs uvicorn until SIGINT / SIGTERM, after
which it admits nothing new, finishes the requests in flight and returns.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Callable


def serve(*, model: str | Path | None = None, params: str | None = None, host: str = "127.0.0.1",
          port: int = 8080, max_concurrency: int = 16, max_queue: int = 64, prefill_chunk: int = 512,
          prefix_cache_gb: float = 1.0, kv_budget_gb: float | None = None, api_key: str | None = None,
          dtype: str | None = None, bits: int | None = None, group_size: int | None = None,
          adapter: str | Path | None = None,
          model_name: str | None = None, keepalive: float = 5.0, on_ready: Callable[[int], None] | None = None
          ) -> None:
    """Serve a model directory or hub id (`model`) or a preset with random weights (`params`).

    `max_concurrency`: sequences decoding together; `max_queue`: requests waiting beyond them (then 429);
    `kv_budget_gb`: the latent-cache memory admission may use (default: half of what is free once the model is
    loaded); `prefix_cache_gb`: the LRU of finished sequences' caches. `on_ready(port)` is called once listening.
    """
    import uvicorn

    from ..api import load, load_preset_model
    from ..config import DEFAULT_PRESET
    from ..device import available_memory
    from ..generation.engine import Engine
    from .app import Server

    if model is not None and params is not None:
        raise ValueError("give either model or params, not both")
    if model is not None:
        m, tok = load(model, dtype=dtype, bits=bits, group_size=group_size)
    else:
        m, tok = load_preset_model(params or DEFAULT_PRESET, dtype=dtype, bits=bits, group_size=group_size)
    if tok is None:
        raise ValueError(f"{model}: no tokenizer.model or tokenizer.json in the model directory")
    if adapter is not None:
        from ..lora import load_adapters
        load_adapters(m, adapter)
    budget = int((kv_budget_gb * 1e9) if kv_budget_gb is not None else available_memory() / 2)
    engine = Engine(m, tok, max_batch=max_concurrency, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    prefix_cache_bytes=int(prefix_cache_gb * 1e9), kv_budget_bytes=budget)
    name = model_name or (str(model) if model is not None else f"dh-mlx-{params or DEFAULT_PRESET}")
    server = Server(engine, tok, name, api_key=api_key, keepalive=keepalive)

    class Uvicorn(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if on_ready is not None and self.started:
                on_ready(self.servers[0].sockets[0].getsockname()[1])

    logging.getLogger("dh_mlx.serve").setLevel(logging.INFO)
    web = Uvicorn(uvicorn.Config(server.app(), host=host, port=port, log_level="warning",
                                 timeout_graceful_shutdown=600))
    # The engine runs on this (the main) thread, where the CPU backend's streams live; HTTP runs in another.
    http = threading.Thread(target=web.run, name="dh-mlx-http", daemon=True)

    def drain(signum, frame) -> None:  # SIGINT / SIGTERM: admit nothing new, let the requests in flight finish
        web.force_exit = server.draining  # (a second one: stop waiting for them)
        server.draining = web.should_exit = True

    previous = {sig: signal.signal(sig, drain) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        engine.run(until=lambda: not http.is_alive())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        web.should_exit = True
        http.join(timeout=600)
