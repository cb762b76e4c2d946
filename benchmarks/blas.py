"""float32 matmul speed of MLX's CPU backend with the optimised BLAS dh_mlx loads vs the wheel's reference BLAS.

Each variant runs in its own process (the BLAS must be chosen before `mlx.core` is imported).
Prints one JSON object per result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time
import dh_mlx, mlx.core as mx
from dh_mlx.device import blas_in_use
n = int(sys.argv[1])
a = mx.random.normal((n, n)); b = mx.random.normal((n, n))
mx.eval(a @ b)
best = float("inf")
for _ in range(5):
    t = time.perf_counter(); mx.eval(a @ b); best = min(best, time.perf_counter() - t)
print(json.dumps({"blas": blas_in_use(), "gflops": 2 * n**3 / best / 1e9}))
"""


def measure(n: int, blas: str | None) -> dict:
    env = dict(os.environ)
    if blas:
        env["DH_MLX_BLAS"] = blas
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    fast, ref = measure(n, None), measure(n, "off")
    print(json.dumps({"name": f"matmul_f32_{n}", "value": round(fast["gflops"], 1), "unit": "GFLOP/s",
                      "blas": fast["blas"], "comparison": {"reference_blas_gflops": round(ref["gflops"], 2),
                                                          "speedup": round(fast["gflops"] / ref["gflops"], 1)}}))


if __name__ == "__main__":
    main()
