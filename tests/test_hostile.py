"""Hostile weight files run nothing: TorchScript `__setstate__` side effects, pickled sample inputs and
`use_pickle` weights in torch.export archives, a code-running pickle in a zip dressed as TorchScript. Each is
first shown to run its payload in PyTorch's own loader (the premise), then imported under every file name."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from typing import Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dh_mlx.convert import ConvertError, import_checkpoint  # noqa: E402
from dh_mlx.convert.torch_archive import read_export_archive, read_pickle_archive  # noqa: E402

NAMES = ["model.pt", "model.ot", "model.pt2", "model.bin", "model.pth", "weights"]


class _Touch:
    """Pickled, it runs `touch PATH` when unpickled by a loader that executes pickles."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _Evil(torch.nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3))

    def forward(self, x):
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return self.marker, self.weight, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.marker, self.weight = state[0], state[1]
        written = torch.from_file(self.marker, shared=True, size=8)  # writes a file at load time
        self.training = state[2] and written.numel() == 8  # used, so TorchScript keeps the call


def _rezip(src, dst, replace: dict[str, bytes]):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, replace.get(item.filename, zin.read(item.filename)))


def _export(path):
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

    program = torch.export.export(Lin(), (torch.randn(2, 3),))
    torch.export.save(program, str(path), extra_files={"config.json": "{}"})
    return zipfile.ZipFile(path).namelist()


def _assert_nothing_ran(path, marker, tmp_path):
    for name in NAMES:
        target = tmp_path / "as" / name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, target)
        try:
            import_checkpoint(target, tmp_path / "out" / name, config=tmp_path / "cfg.json")
        except (ConvertError, ValueError):
            pass
        assert not os.path.exists(marker), name


@pytest.fixture
def cfg(tmp_path):
    from helpers import make_config
    (tmp_path / "cfg.json").write_text(json.dumps(make_config().to_dict()))


def test_torchscript_setstate_runs_nothing(tmp_path, cfg):
    marker = tmp_path / "ran-setstate"
    torch.jit.script(_Evil(str(marker))).save(str(tmp_path / "evil.pt"))
    torch.jit.load(str(tmp_path / "evil.pt"))
    assert marker.exists()  # the premise: PyTorch's loader runs the archive's __setstate__
    marker.unlink()
    with pytest.raises(ConvertError, match="only in a custom __setstate__ state"):  # unnamed without running it
        read_pickle_archive(tmp_path / "evil.pt")
    _assert_nothing_ran(tmp_path / "evil.pt", marker, tmp_path)


def test_torchscript_tensors_are_read_without_running_it(tmp_path):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 4)
            self.register_buffer("halves", torch.arange(5, dtype=torch.bfloat16) / 3)

        def forward(self, x):
            return self.a(x)

    module = Two()
    torch.jit.script(module).save(str(tmp_path / "two.ot"))
    got = read_pickle_archive(tmp_path / "two.ot")
    assert set(got) == {"a.weight", "a.bias", "halves"}
    assert np.array_equal(got["a.weight"].array, module.a.weight.detach().numpy())
    assert np.array_equal(got["halves"].array, module.halves.view(torch.int16).numpy().view(np.uint16))


def _dressed_as_torchscript(tmp_path, marker, name):
    """A torch.save zip whose data.pkl runs `touch marker` when unpickled, with TorchScript's entries added."""
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    prefix = zipfile.ZipFile(tmp_path / "plain.pt").namelist()[0].split("/")[0]
    _rezip(tmp_path / "plain.pt", tmp_path / name, {f"{prefix}/data.pkl": pickle.dumps({"w": _Touch(marker)})})
    with zipfile.ZipFile(tmp_path / name, "a") as z:
        z.writestr(f"{prefix}/constants.pkl", pickle.dumps(()))
        z.writestr(f"{prefix}/code/__torch__.py", "")
    return prefix


def test_a_pickle_in_a_zip_dressed_as_torchscript_runs_nothing(tmp_path, cfg):
    marker = tmp_path / "ran-pickle"
    prefix = _dressed_as_torchscript(tmp_path, marker, "dressed.pt")
    with zipfile.ZipFile(tmp_path / "dressed.pt") as z:
        pickle.loads(z.read(f"{prefix}/data.pkl"))
    assert marker.exists()  # the premise: unpickled as pickle does it, the payload runs
    marker.unlink()
    with pytest.raises(ConvertError, match="posix.system|os.system"):
        read_pickle_archive(tmp_path / "dressed.pt")
    _assert_nothing_ran(tmp_path / "dressed.pt", marker, tmp_path)


def test_torch_export_sample_inputs_are_never_unpickled(tmp_path, cfg):
    marker = tmp_path / "ran-sample-inputs"
    names = _export(tmp_path / "m.pt2")
    (sample,) = [n for n in names if "sample_inputs" in n]
    _rezip(tmp_path / "m.pt2", tmp_path / "evil.pt2", {sample: pickle.dumps(_Touch(marker))})
    try:
        torch.export.load(str(tmp_path / "evil.pt2"))
    except Exception:
        pass
    assert marker.exists()  # the premise: torch.export.load unpickles its sample inputs
    marker.unlink()
    assert set(read_export_archive(tmp_path / "evil.pt2")) == {"lin.weight", "lin.bias"}
    _assert_nothing_ran(tmp_path / "evil.pt2", marker, tmp_path)


def test_torch_export_pickled_weights_are_refused(tmp_path, cfg):
    marker = tmp_path / "ran-use-pickle"
    names = _export(tmp_path / "m.pt2")
    (wcfg,) = [n for n in names if n.endswith("model_weights_config.json")]
    config = json.loads(zipfile.ZipFile(tmp_path / "m.pt2").read(wcfg))
    entry = config["config"]["lin.weight"]
    entry["use_pickle"] = True
    weight = wcfg.rsplit("/", 1)[0] + "/" + entry["path_name"]
    _rezip(tmp_path / "m.pt2", tmp_path / "evil.pt2", {wcfg: json.dumps(config).encode(),
                                                      weight: pickle.dumps(_Touch(marker))})
    with pytest.raises(ConvertError, match="'lin.weight' is stored as a pickle"):
        read_export_archive(tmp_path / "evil.pt2")
    _assert_nothing_ran(tmp_path / "evil.pt2", marker, tmp_path)


def test_the_cli_refuses_in_one_line_and_trust_code_is_explicit(tmp_path, cfg):
    marker = tmp_path / "ran-cli"
    _dressed_as_torchscript(tmp_path, marker, "m.ot")
    r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "convert", "import", "--input", str(tmp_path / "m.ot"),
                        "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()
    from typer.main import get_command

    from dh_mlx.cli import app
    (flag,) = [p for p in get_command(app).commands["convert"].commands["import"].params if p.name == "trust_code"]
    assert flag.default is False and "RUN CODE" in flag.help



# ---- crafted pickles: the reader's own limits -------------------------------------------------------------
def _op_str(x: str) -> bytes:
    b = x.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def _op_int(x: int) -> bytes:
    return b"J" + x.to_bytes(4, "little", signed=True)


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_tensor(size, stride, numel=1, storage=None) -> bytes:
    """_rebuild_tensor_v2(storage '0', offset 0, size, stride, False, {})."""
    storage = storage if storage is not None else _op_global("torch", "FloatStorage")
    pid = b"(" + _op_str("storage") + storage + _op_str("0") + _op_str("cpu") + _op_int(numel) + b"tQ"
    ints = lambda v: b"(" + b"".join(_op_int(x) for x in v) + b"t"  # noqa: E731
    return _op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _op_int(0) + ints(size) + ints(stride) \
        + b"\x89}tR"


def _archive(path, body: bytes, storage: bytes = b"\0\0\x80\x3f", compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + body + b".")
        z.writestr("archive/constants.pkl", pickle.dumps(()))
        z.writestr("archive/data/0", storage, compress_type=compress)
    return path


@pytest.mark.parametrize("case, needle", [
    # BUILD on the storage marker: a new dtype would make the bounds check count rows, not values
    ("storage-build", "tries to change a _Storage"),
    ("tensor-build", "tries to change a RawTensor"),  # BUILD on a tensor: its array replaced by a string
    ("stride-0", "holds more values than its storage"),  # 4 bytes on disk, 1 GiB in memory
    ("bomb", "would inflate to 67108864 bytes"),  # 64 MiB of zeros, bzip2'd to a few hundred bytes
    ("shared-tuples", "holds no tensors"),  # 2^60 paths through 60 shared tuples: visited once each
])
def test_crafted_pickles_stay_inside_the_readers_limits(tmp_path, case, needle):
    import time
    w = _op_str("w")
    bodies = {
        "storage-build": b"}" + w + _op_tensor([1], [1], storage=_op_global("torch", "FloatStorage") + b"}"
                                               + _op_str("dtype") + _op_str("(4,)f8") + b"sb") + b"s",
        "tensor-build": b"}" + w + _op_tensor([1], [1]) + b"}" + _op_str("array") + _op_str("x") + b"sb" + b"s",
        "stride-0": b"}" + w + _op_tensor([16384, 16384], [0, 0]) + b"s",
        "bomb": b"}" + w + _op_tensor([1], [1]) + b"s",
        "shared-tuples": b"]q\x00" + b"h\x00h\x00\x86q\x00" * 60,
    }
    storage = b"\0" * (64 << 20) if case == "bomb" else b"\0\0\x80\x3f"
    path = _archive(tmp_path / "m.pt", bodies[case], storage, zipfile.ZIP_BZIP2 if case == "bomb" else 0)
    t0 = time.perf_counter()
    with pytest.raises(ConvertError, match=needle) as e:
        read_pickle_archive(path)
    assert str(e.value).startswith(str(path)) and time.perf_counter() - t0 < 5


def test_malformed_export_tables_are_named_errors(tmp_path):
    names = _export(tmp_path / "m.pt2")
    (wcfg,) = [n for n in names if n.endswith("model_weights_config.json")]
    good = json.loads(zipfile.ZipFile(tmp_path / "m.pt2").read(wcfg))
    meta = good["config"]["lin.weight"]["tensor_meta"]
    for i, table in enumerate([{"config": []}, {"config": {"lin.weight": {"tensor_meta": []}}},
                               {"config": {"lin.weight": {**good["config"]["lin.weight"],
                                                          "tensor_meta": {**meta, "sizes": 5}}}},
                               {"config": {"lin.weight": {**good["config"]["lin.weight"], "tensor_meta": {
                                   **meta, "sizes": [{"as_int": 1 << 40}, {"as_int": 1 << 40}]}}}}]):
        bad = tmp_path / f"bad{i}.pt2"
        _rezip(tmp_path / "m.pt2", bad, {wcfg: json.dumps(table).encode()})
        with pytest.raises(ConvertError, match=rf"^{bad}: "):
            read_export_archive(bad)


class _Typed(torch.nn.Module):  # TorchScript infers List[int] and Dict[str, Tensor] attributes
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 3)
        self.shape = [2, 3]
        self.named = {"scale": torch.ones(3)}

    def forward(self, x):
        return self.lin(x) * self.named["scale"]


def test_torchscript_typed_containers_are_read(tmp_path):
    torch.jit.script(_Typed()).save(str(tmp_path / "typed.pt"))
    got = read_pickle_archive(tmp_path / "typed.pt")
    assert {"lin.weight", "lin.bias", "named.scale"} <= set(got)
