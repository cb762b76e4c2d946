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

