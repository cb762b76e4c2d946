"""The seam between the model and the CPU backend is explicit: the router and the routed experts take arrays and
plain options (never a module), every implementation gives the numbers of plain per-pair matmuls, and the backend
reads no private attribute of the model."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from dh_mlx import ops
from dh_mlx.backend.cpu import experts as cpu_experts
from dh_mlx.model import moe
from dh_mlx.model.moe import Adapter, Projection, Quantization
from helpers import expert_path

ARRAY_OPS = ("route", "routed_experts", "weighted_experts")
BACKEND = Path(cpu_experts.__file__).resolve().parent.parent


def _leaf_types(hint) -> list:
    """The classes a type hint admits (unions opened, containers' items included)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return [t for a in typing.get_args(hint) for t in _leaf_types(a)]
    if typing.get_origin(hint) is not None:
        return [t for a in typing.get_args(hint) if a is not Ellipsis for t in _leaf_types(a)]
    return [hint]


def _plain(hint, where: str) -> None:
    """Arrays, numbers, strings, None, or frozen dataclasses of those: never an `nn.Module`."""
    for t in _leaf_types(hint):
        assert isinstance(t, type), (where, t)
        assert not issubclass(t, nn.Module), f"{where}: takes the module {t.__name__}"
        if dataclasses.is_dataclass(t):
            assert t.__dataclass_params__.frozen, f"{where}: {t.__name__} is not frozen"
            for name, field_hint in typing.get_type_hints(t).items():
                _plain(field_hint, f"{where}.{t.__name__}.{name}")
        else:
            assert t in (mx.array, int, float, bool, str, type(None)), (where, t)


@pytest.mark.parametrize("name", ARRAY_OPS)
def test_router_and_expert_operations_take_arrays_and_plain_options(name):
    ref = ops.reference(name)
    hints = typing.get_type_hints(ref)
    params = inspect.signature(ref).parameters
    for p in params:
        _plain(hints[p], f"{name}({p})")
    impl = cpu_experts.IMPLEMENTATIONS[name]  # the CPU implementation: the same arguments
    assert list(inspect.signature(impl).parameters) == list(params)
    for p, hint in typing.get_type_hints(impl).items():
        if p != "return":
            _plain(hint, f"backend {name}({p})")


def _imports(path: Path) -> list[tuple[str, list[ast.alias]]]:
    """(absolute dh_mlx module, names) for each `from ... import` of a backend file."""
    parts = list(path.relative_to(BACKEND.parent.parent).with_suffix("").parts)
    package = parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            out.append((".".join(base + ([node.module] if node.module else [])), node.names))
    return out


def test_the_backend_reads_no_private_attribute_of_the_model_and_imports_no_module_class():
    """Private attributes only of the backend's own modules; from the model, functions, constants and plain
    types, never a module class (nor `dh_mlx.lora`'s)."""
    files = sorted(BACKEND.rglob("*.py"))
    assert any(f.name == "experts.py" for f in files)
    for path in files:
        imported = _imports(path)
        own = {a.asname or a.name for m, names in imported if m.startswith("dh_mlx.backend") for a in names}
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__"):
                assert isinstance(n.value, ast.Name) and n.value.id in own, (path.name, n.attr)
        for module, names in imported:
            assert module != "dh_mlx.lora", f"{path.name} imports dh_mlx.lora"
            if module.startswith("dh_mlx.model"):
                source = __import__(module, fromlist=["_"])
                for a in names:
                    obj = getattr(source, a.name)
                    assert not (isinstance(obj, type) and issubclass(obj, nn.Module)), (path.name, a.name)


def _experts_arrays(seed: int, E: int = 6, D: int = 64, I: int = 32):
    k = mx.random.split(mx.random.key(seed), 3)
    return tuple(mx.random.normal(s, key=kk) * 0.2 for s, kk in zip(((E, I, D), (E, I, D), (E, D, I)), k))


def _per_pair(x, idx, gate, up, down):
    """Each (token, slot) pair through its expert with plain float matmuls (numpy, float64)."""
    x, idx = np.array(x, np.float64), np.array(idx)
    g, u, d = (np.array(w, np.float64) for w in (gate, up, down))
    y = np.zeros((*idx.shape, x.shape[-1]))
    for n in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            a, b = g[e] @ x[n], u[e] @ x[n]
            y[n, j] = d[e] @ (a / (1 + np.exp(-a)) * b)
    return y


def _cases(seed: int):
    """(name, (gate, up, down) Projections built from arrays alone, the float weights they stand for)."""
    g, u, d = _experts_arrays(seed)
    yield "float32", tuple(Projection(w) for w in (g, u, d)), (g, u, d)
    q = Quantization(group_size=32, bits=4)
    packed = [mx.quantize(w, 32, 4) for w in (g, u, d)]
    deq = [mx.dequantize(*p, 32, 4) for p in packed]
    yield "4-bit", tuple(Projection(*p, quantization=q) for p in packed), deq
    adapters, adapted = [], []
    for j, w in enumerate((g, u, d)):
        a = mx.random.normal((w.shape[0], 4, w.shape[2]), key=mx.random.key(seed + 10 + j)) * 0.1
        b = mx.random.normal((w.shape[0], w.shape[1], 4), key=mx.random.key(seed + 20 + j)) * 0.1
        adapters.append(Projection(w, adapter=Adapter(a, b, 2.0)))
        adapted.append(w + 2.0 * (b @ a))
    yield "LoRA", tuple(adapters), adapted


@pytest.mark.parametrize("n", [2, 40, 300])  # decode (one node), the native layout, per-expert / blocked
def test_expert_operations_on_plain_arrays_equal_per_pair_matmuls(n):
    x = mx.random.normal((n, 64), key=mx.random.key(n))
    idx = mx.argpartition(-mx.random.normal((n, 6), key=mx.random.key(n + 1)), kth=1, axis=-1)[:, :2]
    w = mx.random.uniform(shape=(n, 2), key=mx.random.key(n + 2))
    for name, projections, floats in _cases(n):
        want = _per_pair(x, idx, *floats)
        assert np.abs(want).max() > 0.05
        paths = [None, "gather", "blocked"] + (["native"] if cpu_experts.native_ok(projections, x) else []) \
            + (["segments"] if name == "float32" else [])
        for path in paths:
            with expert_path(path):
                y = moe.routed_experts(x, idx, *projections)
                yw = moe.weighted_experts(x, idx, w, *projections)
            np.testing.assert_allclose(np.array(y), want, atol=2e-5, err_msg=f"{name} {path}")
            np.testing.assert_allclose(np.array(yw), (want * np.array(w)[..., None]).sum(1), atol=2e-5,
                                       err_msg=f"{name} {path} weighted")
