"""float32 matmul speed of MLX's CPU backend with the optimised BLAS dh_mlx loads vs the wheel's reference BLAS,
and with each optimised BLAS installed (MKL, OpenBLAS) on the shapes `tiny`'s training step multiplies at one
BLAS thread per call (the split step's setting): which one dh_mlx should choose on this CPU.

Each variant runs in its own process (the BLAS must be chosen before `mlx.core` is imported).
Prints one JSON object per result.

    python benchmarks/blas.py [N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time
import dh_mlx, mlx.core as mx
from dh_mlx.backend import blas_threads
from dh_mlx.backend.cpu.blas import loaded
out = {"blas": loaded}
for spec in sys.argv[1:]:
    m, k, n, threads = (int(x) for x in spec.split("x"))
    a = mx.random.normal((m, k)); b = mx.random.normal((k, n))
    with blas_threads(threads or None):
        mx.eval(a @ b)
        best = float("inf")
        for _ in range(max(5, int(2e9 / (2 * m * k * n)))):
            t = time.perf_counter(); mx.eval(a @ b); best = min(best, time.perf_counter() - t)
    out[spec] = 2 * m * k * n / best / 1e9
print(json.dumps(out))
"""

# (rows, inner, cols, BLAS threads; 0: as configured): lm_head, an expert's forward and its weight gradient
# (~43 rows per expert and half-batch), the dense MLP, at one thread as in the split training step
TRAINING_SHAPES = ("1024x512x8192x1", "43x512x256x1", "256x43x512x1", "1024x512x1408x1")


def measure(specs: list[str], blas: str | None) -> dict:
    env = dict(os.environ)
    if blas:
        env["DH_MLX_BLAS"] = blas
    out = subprocess.run([sys.executable, "-c", CHILD, *specs], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from dh_mlx.backend import cpu_description

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    square = f"{n}x{n}x{n}x0"
    fast, ref = measure([square, *TRAINING_SHAPES], None), measure([square], "off")
    print(json.dumps({"name": f"matmul_f32_{n}", "value": round(fast[square], 1), "unit": "GFLOP/s",
                      "blas": fast["blas"], "cpu": cpu_description(),
                      "comparison": {"reference_blas_gflops": round(ref[square], 2),
                                     "speedup": round(fast[square] / ref[square], 1)}}))
    others = {}
    for name in ("mkl", "openblas"):
        got = measure(TRAINING_SHAPES, name)
        if got["blas"] != fast["blas"] and not got["blas"].startswith("reference"):
            others[name] = got
    for spec in TRAINING_SHAPES:
        print(json.dumps({"name": f"matmul_f32_{spec.rsplit('x', 1)[0]}_1_thread", "value": round(fast[spec], 1),
                          "unit": "GFLOP/s", "blas": fast["blas"],
                          "comparison": {o["blas"]: round(o[spec], 1) for o in others.values()} |
                          {f"ratio_to_{name}": round(fast[spec] / o[spec], 2) for name, o in others.items()}}))


if __name__ == "__main__":
    main()
