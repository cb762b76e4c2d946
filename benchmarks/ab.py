"""A/B of this checkout against an earlier commit: prefill and decode of `1b`, and training steps of `tiny`.

Each measurement runs in a fresh process whose `import dh_mlx` is one checkout or the other (a git worktree
of `--base` for the old one), alternating old/new for `--rounds` rounds after one warm-up round of each (which
builds the compiled kernels and native extension). Prints one JSON object per metric: the median of each side
and the ratio new/old (>1: the new commit is faster).

    python benchmarks/ab.py --base 78236a6     # [--rounds 3] [--kinds decode,train] [--train-steps 9]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs in the child: works with both package layouts (setup at import before dh_mlx.backend existed).
CHILD = r'''
import json, sys, time
kind, model_dir, prompt_tokens, gen_tokens, train_steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
import dh_mlx
from pathlib import Path
if (Path(dh_mlx.__file__).parent / "backend").is_dir():
    from dh_mlx import backend
    backend.setup(training=kind == "train")
elif kind == "train":
    from dh_mlx.device import widen_eval_order
    widen_eval_order()
import mlx.core as mx
import numpy as np
out = {"file": dh_mlx.__file__}
if kind == "decode":
    try:
        from dh_mlx.generation import GenerationStats, generate_tokens
    except ImportError:
        from dh_mlx.generate import GenerationStats, generate_tokens
    model = dh_mlx.load_model(model_dir)
    prompt = np.random.default_rng(0).integers(3, 8000, prompt_tokens).tolist()
    runs = []
    for _ in range(3):  # the first warms up
        s = GenerationStats()
        list(generate_tokens(model, prompt, max_tokens=gen_tokens, mtp=False, stats=s))
        runs.append((s.prompt_tps, s.generation_tps))
    out.update(prefill=max(r[0] for r in runs[1:]), decode=max(r[1] for r in runs[1:]))
else:
    from dh_mlx.train.config import TrainConfig
    from dh_mlx.train.trainer import build_steps, make_optimizer
    from dh_mlx.config import load_config
    model = dh_mlx.random_model(load_config(Path(model_dir).parent / "tiny"), seed=0)  # one shape for both sides
    model.freeze(keys=["e_score_correction_bias"], strict=False)
    B, T, steps, warm = 4, 256, train_steps + 3, 3
    cfg = TrainConfig(steps=steps, batch_size=B, seq_len=T, lr=1e-4, warmup_steps=0)
    fns = build_steps(model, make_optimizer(cfg), cfg)
    rng = np.random.default_rng(0)
    ones, seg, dom = mx.ones((B, T)), mx.zeros((B, T), mx.int32), mx.full((B, T), -1, mx.int32)
    for i in range(steps):
        if i == warm:
            tic = time.perf_counter()
        a = rng.integers(3, model.config.vocab_size, (B, T + 1)).astype(np.int32)
        loss, *_ = fns.step(mx.array(a[:, :-1]), mx.array(a[:, 1:]), ones, seg, dom)
        fns.eval(loss)
    out.update(train=B * T * (steps - warm) / (time.perf_counter() - tic))
print(json.dumps(out))
'''


def run(checkout: Path, kind: str, model_dir: Path, a) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(model_dir), str(a.prompt_tokens), str(a.gen_tokens),
                        str(a.train_steps)],
                       env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{checkout} {kind} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not Path(out.pop("file")).resolve().is_relative_to(checkout.resolve()):
        raise SystemExit(f"{checkout}: the child imported another dh_mlx")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the earlier commit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=9, help="timed training steps (after 3 untimed)")
    ap.add_argument("--kinds", default="decode,train", help="which measurements: decode (prefill too), train")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import dh_mlx
    from dh_mlx import backend, load_preset, random_model, save_model

    work = Path(tempfile.mkdtemp(prefix="dh-ab-"))
    old = work / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), a.base], check=True,
                   capture_output=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    try:
        from dh_mlx.config import save_config
        (work / "tiny").mkdir()
        save_config(load_preset("tiny"), work / "tiny")  # this checkout's tiny, trained by both sides
        if "decode" in a.kinds:
            save_model(random_model(load_preset("1b"), seed=0), work / "1b")
            import mlx.core as mx
            mx.clear_cache()  # the children measure; this process keeps no buffers of the 1b weights
        sides = {"old": old, "new": REPO}
        results: dict[str, dict[str, list[float]]] = {s: {} for s in sides}
        for r in range(a.rounds + 1):
            for kind in a.kinds.split(","):
                for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    out = run(sides[side], kind, work / "1b", a)
                    if r:  # round 0 warms both checkouts up (kernel and extension builds)
                        for k, v in out.items():
                            results[side].setdefault(k, []).append(v)
        machine = backend.cpu_description()
        for metric in [m for m in ("prefill", "decode", "train") if m in results["new"]]:
            unit = "tokens/s"
            o, n = statistics.median(results["old"][metric]), statistics.median(results["new"][metric])
            what = {"prefill": f"1b, {a.prompt_tokens}-token prompt", "decode": f"1b, {a.gen_tokens} tokens",
                    "train": f"tiny (this checkout's shape), batch 4 x 256, {a.train_steps} steps"}[metric]
            print(json.dumps({"name": f"ab_{metric}", "value": round(n / o, 3), "unit": "new/old",
                              "comparison": {"new": round(n, 2), "old": round(o, 2), "unit": unit, "what": what,
                                             "rounds": a.rounds, "new_commit": head, "old_commit": a.base,
                                             "machine": machine, "dh_mlx": dh_mlx.__version__}}), flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
