"""The one seam between the model and a backend.

Model and training code mark the few operations a backend may run faster with `@replaceable(name)`; the
decorated function is the reference, plain MLX, and what runs on Metal. A backend `register`s a function
with the same arguments that returns the same value and gradient; calls then go to it. The model never
knows which implementation ran. `reference_only()` turns every registered implementation off for a block.
Pure Python: importing this module imports nothing.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator

_references: dict[str, Callable] = {}
_registered: dict[str, Callable] = {}


def replaceable(name: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` is the reference implementation of operation `name`."""
    def wrap(fn: Callable) -> Callable:
        if name in _references:
            raise ValueError(f"replaceable operation {name!r} is defined twice")
        _references[name] = fn

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return _registered.get(name, fn)(*args, **kwargs)

        call.reference = fn
        call.op_name = name
        return call
    return wrap


def register(name: str, impl: Callable) -> None:
    """Route calls of operation `name` to `impl` (same arguments, value and gradient as the reference)."""
    _registered[name] = impl


def reference(name: str) -> Callable:
    """The reference implementation of `name` (its defining module must have been imported)."""
    try:
        return _references[name]
    except KeyError:
        raise ValueError(f"no replaceable operation {name!r}; known: {', '.join(sorted(_references))}") from None


def registered() -> dict[str, Callable]:
    """Operation name -> the implementation that replaces its reference."""
    return dict(_registered)


@contextmanager
def reference_only() -> Iterator[None]:
    """Inside the block every operation runs its reference implementation."""
    saved = dict(_registered)
    _registered.clear()
    try:
        yield
    finally:
        _registered.update(saved)


@contextmanager
def using(**impls: Callable | None) -> Iterator[None]:
    """Inside the block the given operations run these implementations (None: the reference)."""
    saved = dict(_registered)
    for name, impl in impls.items():
        if impl is None:
            _registered.pop(name, None)
        else:
            _registered[name] = impl
    try:
        yield
    finally:
        _registered.clear()
        _registered.update(saved)
