"""Tensors out of PyTorch zip archives without running anything from the file.

A TorchScript archive (`torch.jit.save`, tch-rs `VarStore::save`) holds `data.pkl`: a pickle of the module tree
whose tensors point at raw storages `data/N`. `torch.jit.load` would also run the archive's TorchScript code
(a class's `__setstate__` included), and a plain unpickler calls whatever the pickle names. Here a restricted
unpickler rebuilds only tensors (as numpy arrays), containers and inert stand-ins for the archive's classes.
A torch.export archive (`.pt2`) lists its weights in `model_weights_config.json` beside raw storages; its
pickled parts (sample inputs, weights saved with `use_pickle`) are never unpickled.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ConvertError

# Legacy typed-storage names (what data.pkl refers to) and torch.export's ScalarType numbers -> numpy dtypes;
# bfloat16 travels as its raw uint16 bits (numpy has no bfloat16).
_STORAGES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
             "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
             "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
_SCALAR_TYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32",
                 8: "float64", 12: "bool", 13: "bfloat16"}


def _refuse_setstate(self: Any, state: Any) -> None:
    """A pickle's BUILD calls `__setstate__`; the one dataclasses add to frozen slots classes would set fields."""
    raise ConvertError(f"the archive's pickle tries to change a {type(self).__name__}; refused")


@dataclass(frozen=True, slots=True)
class RawTensor:
    """A tensor read from an archive: its values, and its dtype name (bfloat16 values are uint16 bits)."""

    array: np.ndarray
    dtype: str
    __setstate__ = _refuse_setstate

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


def _np_dtype(name: str) -> np.dtype:
    return np.dtype("uint16" if name == "bfloat16" else name)


def _strided(flat: np.ndarray, dtype: str, offset: Any, size: Any, stride: Any, where: str) -> RawTensor:
    """`flat[offset:]` viewed with `size` and `stride` (in elements), after checking it stays inside `flat`."""
    ints = lambda v: isinstance(v, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                          for i in v)
    if not (isinstance(flat, np.ndarray) and flat.ndim == 1 and isinstance(offset, int) and offset >= 0
            and ints(size) and ints(stride) and len(size) == len(stride) <= 16):
        raise ConvertError(f"{where}: a tensor record with offset {offset!r}, size {size!r}, stride {stride!r}")
    if int(np.prod(size, dtype=object)) > flat.size:  # a weights file has no use for broadcast (stride-0) views
        raise ConvertError(f"{where}: a tensor of size {tuple(size)} holds more values than its storage ({flat.size})")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
    if extent > flat.size:
        raise ConvertError(f"{where}: a tensor of size {tuple(size)} reaches element {extent} of a storage "
                           f"holding {flat.size}")
    view = np.lib.stride_tricks.as_strided(flat[offset:] if all(size) else flat[:0], shape=tuple(size),
                                           strides=[s * flat.itemsize for s in stride])
    return RawTensor(np.array(view), dtype)


@dataclass(frozen=True, slots=True)
class _Storage:
    dtype: str
    __setstate__ = _refuse_setstate


class _Stub:
    """Stands for a class the archive names (a TorchScript module, say): it keeps its state and runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Stub":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:  # ours, in place of the class's own (TorchScript code)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["__state__"] = state


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, where: str, limit: int):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.where, self.limit = archive, prefix, where, limit
        self.stubs: dict[str, type] = {}
        self.storages: dict[str, tuple[np.ndarray, str]] = {}  # each read once, however often it is named
        self.rebuilt = 0  # tensors rebuilt, named or not

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, hooks=None: data
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _TORCHSCRIPT_TAGS:  # typed containers: the value itself
            return lambda value, *tags: value
        if module == "torch" and name in _STORAGES:
            return _Storage(_STORAGES[name])
        if module.startswith("__torch__"):  # TorchScript classes: a stand-in that never runs their code
            return self.stubs.setdefault(f"{module}.{name}", type(name, (_Stub,), {}))
        raise ConvertError(f"{self.where}: the archive's pickle names {module}.{name}, which a weights file has "
                           "no need for; refused (nothing from the file was run)")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise ConvertError(f"{self.where}: an unexpected storage record {pid!r:.80}")
        _, storage, key, _, numel = pid
        if key in self.storages:
            return self.storages[key]
        raw = _read_member(self.archive, f"{self.prefix}data/{key}", self.limit, self.where)
        dtype = _np_dtype(storage.dtype)
        if len(raw) < numel * dtype.itemsize:
            raise ConvertError(f"{self.where}: storage {key!r} holds {len(raw)} bytes, {numel} x {dtype.itemsize} "
                               "expected")
        self.storages[key] = (np.frombuffer(raw, dtype=dtype, count=numel), storage.dtype)
        return self.storages[key]

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> RawTensor:
        if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[0], np.ndarray)):
            raise ConvertError(f"{self.where}: a tensor without a storage")
        self.rebuilt += 1
        return _strided(storage[0], storage[1], offset, size, stride, self.where)


_TORCHSCRIPT_TAGS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")


def _read_member(archive: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    """One zip member, refused when it would inflate past `limit` bytes (PyTorch stores storages uncompressed,
    so a member larger than its archive is a zip bomb, not a tensor)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise ConvertError(f"{where}: {name} is missing from the archive") from None
    if info.file_size > limit:
        raise ConvertError(f"{where}: {name} would inflate to {info.file_size} bytes, more than the archive "
                           f"holds ({limit}); refused")
    return archive.read(info)


def _tensors_of(obj: Any, prefix: str = "", seen: set | None = None) -> dict[str, RawTensor]:
    """Name -> tensor over a module tree of stand-ins (or a state_dict), names joined by '.'."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return {}
    seen.add(id(obj))
    items = obj.items() if isinstance(obj, dict) else vars(obj).items() if isinstance(obj, _Stub) else ()
    out: dict[str, RawTensor] = {}
    for k, v in items:
        if not isinstance(k, str):
            continue
        if isinstance(v, RawTensor):
            out[prefix + k] = v
        elif isinstance(v, (_Stub, dict)):
            out.update(_tensors_of(v, f"{prefix}{k}.", seen))
    return out


@contextmanager
def _opened(path: Path, leaf: str, kind: str) -> Iterator[tuple[zipfile.ZipFile, str, int]]:
    """(the zip, its top folder `prefix/`, the byte limit for a member) of an archive with `prefix/leaf`."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/" + leaf) and n.count("/") == 1]
        if not names:
            raise ConvertError(f"{path}: no top-level {leaf} (not {kind})")
        yield archive, names[0][: -len(leaf)], path.stat().st_size


def read_pickle_archive(path: Path) -> dict[str, RawTensor]:
    """The tensors of a TorchScript archive or a `torch.save` zip (its `data.pkl`), named as in its state_dict."""
    with _opened(path, "data.pkl", "a TorchScript or torch.save archive") as (archive, prefix, limit):
        try:
            data = _read_member(archive, prefix + "data.pkl", limit, str(path))
            unpickler = _ArchiveUnpickler(data, archive, prefix, str(path), limit)
            root = unpickler.load()
        except ConvertError as e:
            raise e if str(e).startswith(str(path)) else ConvertError(f"{path}: {e}") from None
        except Exception as e:  # a malformed pickle: truncated, bad opcodes, records of the wrong kind
            raise ConvertError(f"{path}: cannot read data.pkl: {type(e).__name__}: {e}") from None
    tensors = _tensors_of(root)
    if not tensors:
        raise ConvertError(f"{path}: " + ("its tensors sit only in a custom __setstate__ state, which has no names "
                                          "without running the archive's code (`trust_code=True`, for a file you trust)"
                                          if unpickler.rebuilt else "the archive holds no tensors"))
    return tensors


def read_export_archive(path: Path) -> dict[str, RawTensor]:
    """The weights of a torch.export archive (`.pt2`) by their names in the exported module."""
    with _opened(path, "archive_format", "a torch.export archive") as (archive, prefix, limit):
        cfg_name = f"{prefix}data/weights/model_weights_config.json"
        try:
            config = json.loads(_read_member(archive, cfg_name, limit, str(path)))["config"]
            return {name: _export_weight(archive, prefix, name, entry, limit, f"{path}: weight {name!r}")
                    for name, entry in config.items()}
        except ConvertError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise ConvertError(f"{path}: {cfg_name} is not a weights table ({type(e).__name__}: {e})") from None


def _export_weight(archive: zipfile.ZipFile, prefix: str, name: str, entry: Any, limit: int, where: str) -> RawTensor:
    if not isinstance(entry, dict) or entry.get("use_pickle"):
        raise ConvertError(f"{where} is stored as a pickle, which could run code; refused (re-export it "
                           "with plain tensors, or pass `trust_code=True` for a file you trust)")
    meta = entry["tensor_meta"]
    dtype = _SCALAR_TYPES.get(meta.get("dtype"))
    if dtype is None:
        raise ConvertError(f"{where}: dtype number {meta.get('dtype')!r} is not supported")
    sym = lambda v: v.get("as_int") if isinstance(v, dict) else None  # noqa: E731
    raw = _read_member(archive, f"{prefix}data/weights/{entry['path_name']}", limit, where)
    flat = np.frombuffer(raw, dtype=_np_dtype(dtype), count=len(raw) // _np_dtype(dtype).itemsize)
    return _strided(flat, dtype, sym(meta.get("storage_offset", {})), [sym(s) for s in meta["sizes"]],
                    [sym(s) for s in meta["strides"]], where)
