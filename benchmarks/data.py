"""Training data at scale: `dh-mlx data prepare` throughput and memory, and the time and memory to reach
training step 1 from prepared data and from raw JSONL, on generated corpora (default 200 MB and 2 GB, written
under --dir, never into the repository).

Prints one JSON object per result:
  tokenizer_encode   the tokenizer's own single-core speed on the corpus's texts (no JSON, no writing), per CPU
                     second
  prepare            MB/s and tokens/s of `dh-mlx data prepare` on every core; its fraction of the tokenizer's
                     speed times the cores (wall clock), and per CPU second; the peak memory (all processes;
                     sampled from /proc every 10 ms, and as the processes report their peaks)
  step1              seconds and peak memory from process start to the end of training step 1, with the data's
                     share (opened and first batch read): from the prepared directory, from the raw JSONL with a
                     cold cache (it is prepared first) and a warm one, and with the in-memory pipeline that
                     `train` used before prepared data (--in-memory-mb sizes only: it holds ~37 bytes a token)

    python benchmarks/data.py [--sizes 200,2000] [--dir /tmp/dh-mlx-data-bench] [--in-memory-mb 200]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def emit(name: str, **fields) -> None:
    print(json.dumps({"name": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}}),
          flush=True)


def generate(path: Path, size_mb: int, seed: int = 0) -> Path:
    """A JSONL of `size_mb` MB drawn from the bundled corpus: slices of its texts (~1.5 KB) as text (70 %),
    prompt/completion (15 %) and chat (15 %) records, with their domains."""
    if path.is_file() and path.stat().st_size >= size_mb * 1e6:
        return path
    texts = [json.loads(line) for line in open(REPO / "data" / "train_data.jsonl")]
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while f.tell() < size_mb * 1e6:
            lines = []
            for k, n, kind in zip(rng.integers(0, len(texts), 2000), rng.lognormal(7.2, 0.6, 2000).astype(int),
                                  rng.random(2000)):
                r = texts[k]
                a = int(rng.integers(0, max(1, len(r["text"]) - n)))
                t = r["text"][a:a + max(n, 20)] or r["text"]
                cut = len(t) // 3
                if kind < 0.7:
                    rec = {"domain": r["domain"], "text": t}
                elif kind < 0.85:
                    rec = {"domain": r["domain"], "prompt": t[:cut], "completion": t[cut:]}
                else:
                    rec = {"domain": r["domain"], "messages": [{"role": "user", "content": t[:cut]},
                                                                {"role": "assistant", "content": t[cut:]}]}
                lines.append(json.dumps(rec))
            f.write("\n".join(lines) + "\n")
    tmp.rename(path)
    return path


def encode_speed(corpus: Path, tok, sample_mb: float = 8.0) -> tuple[float, float]:
    """(JSONL MB, tokens) per CPU second of `tok.encode` alone on the texts of the corpus's first `sample_mb` MB
    (CPU time: on a shared machine the wall clock also counts others' work)."""
    from dh_mlx.train.records import parse_line
    texts, size = [], 0
    with open(corpus, "rb") as f:
        for raw in f:
            size += len(raw)
            texts += [p.text for p in parse_line(raw)[1]]
            if size > sample_mb * 1e6:
                break
    best = None
    for _ in range(2):
        tic, n = time.process_time(), 0
        for t in texts:
            n += len(tok.encode(t))
        dt = time.process_time() - tic
        best = dt if best is None else min(best, dt)
    return size / 1e6 / best, n / best


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    pids, total = [pid], 0
    while pids:
        p = pids.pop()
        try:
            total += int(open(f"/proc/{p}/status").read().split("VmRSS:")[1].split()[0]) * 1024
            for t in os.listdir(f"/proc/{p}/task"):
                pids += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except (OSError, IndexError):
            pass
    return total


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_sampled(cmd: list[str], env: dict, until: str | None = None) -> tuple[float, int, str]:
    """(seconds, peak resident bytes of the process tree, stdout) of `cmd`; with `until`, stop at the first
    stdout line starting with it."""
    tic = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    out = []
    for line in proc.stdout:
        out.append(line)
        if until and line.startswith(until):
            break
    seconds = time.time() - tic
    done.set()
    err = proc.stderr.read() if proc.wait() else ""
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed: {err[-2000:]}")
    return seconds, peak[0], "".join(out)


PREPARE = """
import json, sys
from dh_mlx.train.prepare import prepare
r = prepare([sys.argv[1]], sys.argv[2], force=True, progress=False)
print(json.dumps({"seconds": r.seconds, "mb_per_s": r.mb_per_s, "tokens_per_s": r.tokens_per_s, "tokens": r.tokens_in,
                  "peak": r.peak_bytes, "workers": r.workers, "shards": r.shards}))
"""

# Train a small model to step 1 and report when it got there; with "memory", through the in-memory pipeline.
STEP1 = """
import json, os, sys, time
t0, data, config, out, mode = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
def rss(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
import dh_mlx.train.report as report
import dh_mlx.train.run as run
import dh_mlx.train.setup as setup
marks = {}
opened = setup.open_dataset
if mode == "memory":
    from dh_mlx.train.data import load_dataset
    opened = lambda *a, progress=True, **k: load_dataset(*a, **k)
def timed(*a, **k):
    ds = opened(*a, **k)
    ds.train_batches(8).batch_at(0)
    marks.update(data_s=time.time() - t0, data_rss=rss("VmRSS"), data_peak=rss("VmHWM"))
    return ds
setup.open_dataset = timed
def first(self, record):
    print("STEP1", json.dumps({"seconds": time.time() - t0, "peak": rss("VmHWM"), **marks}), flush=True)
    os._exit(0)
report.MetricsLog.write = first
run.train(config=config, data=data, out=out, force=True, steps=100, eval_every=1000, save_every=1000,
          progress=False)
"""


def step1(data: Path, config: Path, out: Path, env: dict, mode: str = "prepared") -> dict:
    t0 = time.time()
    _, sampled, stdout = run_sampled([sys.executable, "-c", STEP1, str(t0), str(data), str(config), str(out), mode],
                                     env, until="STEP1")
    got = json.loads(stdout.split("STEP1", 1)[1])
    return {**got, "sampled_peak": sampled}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="200,2000", help="corpus sizes, MB")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dh-mlx-data-bench"))
    ap.add_argument("--in-memory-mb", default="200", help="sizes also timed with the in-memory pipeline")
    a = ap.parse_args()
    from dh_mlx.config import DATA_DIR, load_preset, save_config
    from dh_mlx.tokenizer import load_tokenizer
    a.dir.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # a small model: step 1's own compile and compute stay short, so the time is the start-up's
    small = load_preset("tiny").replace(hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                                        num_hidden_layers=2, n_routed_experts=20, kv_lora_rank=32)
    save_config(small, a.dir)
    tok = load_tokenizer(DATA_DIR / "tokenizer")
    cpu_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    # warm-up: the first step on a machine compiles its CPU kernels (cached for the runs timed below)
    step1(DATA_DIR / "train_data.jsonl", a.dir / "config.json", a.dir / "run", {**env, "DH_MLX_DATA_CACHE":
                                                                                 str(a.dir / "warm-cache")})
    for size in [int(s) for s in a.sizes.split(",")]:
        corpus = generate(a.dir / f"corpus-{size}mb.jsonl", size)
        mb_s, tok_s = encode_speed(corpus, tok)
        emit("tokenizer_encode", size_mb=size, mb_per_cpu_s=mb_s, tokens_per_cpu_s=tok_s, cores=1, cpu=cpu_name)
        prep = a.dir / f"prepared-{size}mb"
        cpu = cpu_children()
        seconds, sampled, stdout = run_sampled([sys.executable, "-c", PREPARE, str(corpus), str(prep)], env)
        cpu = cpu_children() - cpu  # the prepare process and its workers
        r = json.loads(stdout)
        emit("prepare", size_mb=size, seconds=seconds, mb_per_s=corpus.stat().st_size / 1e6 / seconds,
             tokens_per_s=r["tokens"] / seconds, tokens=r["tokens"], workers=r["workers"], cores=cores,
             cpu_seconds=cpu, tokens_per_cpu_s=r["tokens"] / cpu,
             # the target's measure: the wall clock against the tokenizer's speed on every core; and per CPU
             # second, what the pipeline adds to the tokenizer whatever else the machine runs
             fraction_of_tokenizer_times_cores=r["tokens"] / seconds / (tok_s * cores),
             fraction_of_tokenizer_per_cpu_s=r["tokens"] / cpu / tok_s,
             peak_mb_sampled=sampled / 1e6, peak_mb_reported=r["peak"] / 1e6, shards=r["shards"],
             load_average=os.getloadavg()[0])  # (a shared machine: other work takes cores too)
        cache = a.dir / "cache"
        runs = [("prepared", prep, {}), ("jsonl_cold_cache", corpus, {"cold": True}), ("jsonl_warm_cache", corpus, {})]
        if str(size) in a.in_memory_mb.split(","):
            runs.append(("in_memory", corpus, {"mode": "memory"}))
        for name, data, how in runs:
            if how.get("cold"):
                shutil.rmtree(cache, ignore_errors=True)
            got = step1(data, a.dir / "config.json", a.dir / "run", {**env, "DH_MLX_DATA_CACHE": str(cache)},
                        how.get("mode", "prepared"))
            emit("step1", size_mb=size, source=name, seconds=got["seconds"], data_seconds=got["data_s"],
                 peak_mb=got["peak"] / 1e6, peak_mb_sampled=got["sampled_peak"] / 1e6,
                 data_rss_mb=got["data_rss"] / 1e6)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(prep, ignore_errors=True)


if __name__ == "__main__":
    main()
