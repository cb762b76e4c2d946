"""The package's shape, read from its source with `ast`: no import cycles, every import goes to the same or a
lower layer (docs/architecture.md), the model never imports a backend, and importing is free of surprises."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dh_mlx"

# Lowest first; a module belongs to the longest prefix listed. docs/architecture.md draws the same table.
LAYERS = [
    ["dh_mlx.ops", "dh_mlx.families", "dh_mlx.config", "dh_mlx.config_v4", "dh_mlx.params", "dh_mlx.rope",
     "dh_mlx.outputs", "dh_mlx.progress", "dh_mlx.files", "dh_mlx.tokenizer",
     "dh_mlx.hf_tokenizer", "dh_mlx.chat",
     "dh_mlx.checkpoint.layout", "dh_mlx.checkpoint"],
    ["dh_mlx.model", "dh_mlx.device"],
    ["dh_mlx.quant", "dh_mlx.lora", "dh_mlx.domains", "dh_mlx.backend"],
    ["dh_mlx.checkpoint.shards", "dh_mlx.checkpoint.streaming", "dh_mlx.checkpoint.weights",
     "dh_mlx.checkpoint.training", "dh_mlx.checkpoint.domains",
     "dh_mlx.checkpoint.v4_weights"],
    ["dh_mlx.generation", "dh_mlx.train", "dh_mlx.torch"],
    ["dh_mlx.convert", "dh_mlx.info", "dh_mlx.plan", "dh_mlx.api", "dh_mlx.serve"],
    ["dh_mlx.cli", "dh_mlx.cli_convert", "dh_mlx.cli_generate", "dh_mlx.cli_options", "dh_mlx"],
]


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """dh_mlx modules `name` imports anywhere in its source (functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            named = {f"{target}.{a.name}" for a in node.names} & known.keys()  # `from pkg import module`
            found.update(named or ({target} & known.keys()))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    found.discard(name)
    return found


def layer(name: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{name}: in no layer of LAYERS"
    return rank


def room(name: str) -> str:
    return ".".join(name.split(".")[:2])


GRAPH = {n: imports(n, p, modules()) for n, p in modules().items()}


def test_no_import_cycles():
    assert "dh_mlx.model.moe" in GRAPH and "dh_mlx.cli" in GRAPH  # the whole package was read
    state: dict[str, int] = {}

    def visit(n: str, trail: list[str]) -> None:
        state[n] = 1
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
            if m not in state:
                visit(m, trail + [m])
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n, [n])


def test_imports_go_to_the_same_or_a_lower_layer():
    bad = [f"{n} (layer {layer(n)}) imports {m} (layer {layer(m)})" for n, deps in sorted(GRAPH.items())
           for m in sorted(deps) if room(n) != room(m) and layer(m) > layer(n)]
    assert not bad, "\n".join(bad)


def test_the_model_is_plain_mlx():
    """model/ imports MLX, the config, RoPE frequencies and the seam: no backend, no device checks."""
    allowed = {"dh_mlx.config", "dh_mlx.config_v4", "dh_mlx.rope", "dh_mlx.ops"}
    for n, deps in GRAPH.items():
        if room(n) == "dh_mlx.model":
            assert {m for m in deps if room(m) != "dh_mlx.model"} <= allowed, (n, deps)
            source = modules()[n].read_text()
            assert "default_device" not in source and "mx.cpu" not in source, n


def test_the_twin_imports_layer_0_the_training_options_and_the_numpy_data_pipeline():
    """torch/ runs where MLX does not: besides layer 0 it imports only train/config.py (the one TrainConfig) and,
    for its trainer, the numpy data pipeline."""
    allowed = {f"dh_mlx.train.{m}" for m in ("config", "records", "data", "shards", "prepare", "prepare_worker",
                                             "prepared")}
    seen = set()
    for n, deps in GRAPH.items():
        if room(n) == "dh_mlx.torch":
            outside = {m for m in deps if room(m) != "dh_mlx.torch" and layer(m) > 0}
            assert outside <= allowed, (n, outside - allowed)
            seen |= outside
    assert "dh_mlx.train.config" in seen


def test_no_module_global_is_rebound_outside_the_backend():
    """State that model, loss and trainer share travels as an argument or an attribute; only the backend keeps
    process-wide facts (what it loaded, and that setup ran)."""
    for n, p in modules().items():
        if room(n) != "dh_mlx.backend":
            assert not any(isinstance(node, ast.Global) for node in ast.walk(ast.parse(p.read_text()))), n


@pytest.mark.slow
@pytest.mark.parametrize("module", ["dh_mlx", "dh_mlx.torch", "dh_mlx.torch.train", "dh_mlx.config",
                                    "dh_mlx.checkpoint.layout", "dh_mlx.train.prepared", "dh_mlx.train.prepare",
                                    "dh_mlx.train.config", "dh_mlx.train.data"])
def test_importing_imports_no_mlx_and_leaves_the_environment(module):
    code = ("import os, sys; before = dict(os.environ); import " + module + "; "
            "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.'))); "
            "print(sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if not k.startswith("DH_MLX")})
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


FLAG = re.compile(r"(^|[\s(/])--[a-z]")
SPEAKS_CLI = ("dh_mlx.cli", "dh_mlx.cli_convert", "dh_mlx.cli_generate", "dh_mlx.cli_options",
              "dh_mlx.torch.train")  # the command lines themselves (torch.train is torchrun's)


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_library_code_speaks_in_arguments_and_never_prints():
    """Errors, notes and status lines name arguments (`force=True`), never command-line flags; nothing but the
    command lines prints."""
    found = []
    for name, path in modules().items():
        if name in SPEAKS_CLI:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            said = node.exc if isinstance(node, ast.Raise) and node.exc is not None else None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id == "print":
                    found.append(f"{name}:{node.lineno}: print")
                if node.func.id in ("note", "status"):
                    said = node
            if said is not None:
                found += [f"{name}:{node.lineno}: {s!r}" for s in _strings(said) if FLAG.search(s)]
    assert not found, "\n".join(found)


def test_the_backend_reads_no_private_name_of_the_model():
    """The seam is the operations' arguments: backend code never reads `obj._x` of another object (the model's
    modules included) nor imports a private name from the model."""
    found = []
    for path in (PACKAGE / "backend").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                if owner not in ("self", "cls") and not (owner or "").startswith("_"):  # `_jit`: a private alias
                    found.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and "model" in (node.module or ""):
                found += [f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, found
