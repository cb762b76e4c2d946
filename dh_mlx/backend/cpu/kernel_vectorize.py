"""Compiler front end for MLX's generated CPU kernels: specialise strided loops so that GCC vectorises them.

MLX compiles each fused elementwise kernel in two variants. The "contiguous" one is a flat loop that GCC
vectorises; the "strided" one, used as soon as one input is broadcast (a softmax's max, a cross-entropy's
targets, a constant shared by two streams), walks every input with a pointer and a run-time stride:

    for (int i1 = 0; i1 < shape[1]; ++i1) {
      float tmp_A = *A;  ...body...  *C++ = tmp_C;
      A += A_strides[1];  B += B_strides[1];
    }

which GCC keeps scalar. In the innermost dimension such inputs almost always
step by 1 or 0 (broadcast), so this rewrites that loop as one copy per combination of unit and zero strides
(zero-stride inputs loaded once, the others indexed), each under `#pragma GCC ivdep` (MLX only ever aliases an
output with an input of the same index), and keeps the original loop for any other stride. Same arithmetic in
the same order per element, so results are bit-identical.

Run as `python kernel_vectorize.py REAL_COMPILER ARGS...` by the wrapper `jit.py` installs (no dh_mlx import:
it runs per kernel build). Any source it does not recognise is compiled unchanged.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

MAX_INPUTS = 4  # 2**4 loop copies at most
_FOR = re.compile(r"^\s*for \(int i(\d+) = 0; i\1 < shape\[\1\]; \+\+i\1\) \{$")
_LOAD = re.compile(r"^\s*([\w:]+) tmp_(\w+) = \*(\w+);$")
_STORE = re.compile(r"^\s*\*(\w+)\+\+ = tmp_(\w+);$")
_STEP = re.compile(r"^\s*(\w+) \+= (\w+)_strides\[(\d+)\];$")


def specialise(source: str) -> str | None:
    """The source with each function's innermost strided loop specialised, or None if nothing matched."""
    lines = source.split("\n")
    out, i, changed = [], 0, False
    while i < len(lines):
        m = _FOR.match(lines[i])
        end = _innermost_end(lines, i) if m else None
        if end is None:
            out.append(lines[i])
            i += 1
            continue
        new = _rewrite(m.group(1), lines[i:end + 1])
        if new is None:
            out.extend(lines[i:end + 1])
        else:
            out.extend(new)
            changed = True
        i = end + 1
    return "\n".join(out) if changed else None


def _innermost_end(lines: list[str], start: int) -> int | None:
    """Index of the `}` closing the loop opened at `start`, if no other loop is nested in it."""
    for j in range(start + 1, len(lines)):
        if _FOR.match(lines[j]):
            return None
        if lines[j].strip() == "}":
            return j
    return None


def _rewrite(dim: str, loop: list[str]) -> list[str] | None:
    loads, stores, steps, body = [], [], [], []
    for line in loop[1:-1]:
        if m := _LOAD.match(line):
            loads.append((m.group(1), m.group(2), m.group(3)))
        elif m := _STORE.match(line):
            stores.append((m.group(1), m.group(2)))
        elif m := _STEP.match(line):
            if m.group(1) != m.group(2) or m.group(3) != dim:
                return None
            steps.append(m.group(1))
        elif "*" in line.split("=", 1)[0] or "++" in line or "+=" in line or "return" in line:
            return None  # a pointer use we do not know
        else:
            body.append(line)
    inputs = [ptr for _, _, ptr in loads]
    if not loads or not stores or sorted(steps) != sorted(inputs) or len(inputs) > MAX_INPUTS:
        return None
    n = f"n{dim}_"
    out = ["  {", f"  const int64_t {n} = shape[{dim}];"]
    out += [f"  const int64_t s{p}_ = {p}_strides[{dim}];" for p in inputs]
    for k, unit in enumerate(itertools.product((1, 0), repeat=len(inputs))):
        cond = " && ".join(f"s{p}_ == {u}" for p, u in zip(inputs, unit))
        out.append(f"  {'if' if k == 0 else '} else if'} ({cond}) {{")
        out += [f"  const {t} c{p}_ = *{p};" for (t, _, p), u in zip(loads, unit) if not u]
        out += ["  #pragma GCC ivdep", f"  for (int64_t j_ = 0; j_ < {n}; ++j_) {{"]
        out += [f"  {t} tmp_{v} = {p}[j_];" if u else f"  {t} tmp_{v} = c{p}_;" for (t, v, p), u in zip(loads, unit)]
        out += body
        out += [f"  {p}[j_] = tmp_{v};" for p, v in stores]
        out.append("  }")
        out += [f"  {p} += {n};" for (_, _, p), u in zip(loads, unit) if u]
        out += [f"  {p} += {n};" for p, _ in stores]
    out.append("  } else {")
    out += loop
    out += ["  }", "  }"]
    return out


def main(argv: list[str]) -> int:
    compiler, original = argv[0], list(argv[1:])
    args, written = list(original), []
    for k, arg in enumerate(args):
        path = Path(arg)
        if path.suffix == ".cpp" and path.is_file():
            try:
                new = specialise(path.read_text())
                if new is not None:
                    vec = path.with_name(f"{path.stem}.vec{os.getpid()}.cpp")
                    vec.write_text(new)
                    written.append(vec)
                    args[k] = str(vec)
            except Exception:  # noqa: BLE001  any surprise: compile MLX's source as it is
                pass
    try:
        rc = subprocess.run([compiler, *args], capture_output=bool(written)).returncode
        if rc and written:  # never let the rewrite break a build: MLX's own source instead
            rc = subprocess.run([compiler, *original]).returncode
        return rc
    finally:
        for vec in written:
            vec.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
