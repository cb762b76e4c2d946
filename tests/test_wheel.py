"""The package installs as a package: a wheel built from the repository carries the presets, the bundled
tokenizer and the sample corpus, and its `dh-mlx` works from a directory outside the repository."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dh_mlx.config import REPO_DIR

pytestmark = pytest.mark.slow  # (not in the quick tier, pytest -m "not slow")

_NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "runs", "exports", "__pycache__", "*.egg-info",
                                     ".venv", ".pytest_cache", "_bundled")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from a copy of the checkout, installed with no dependencies into a folder of its own that
    comes first on PYTHONPATH: this interpreter supplies mlx, numpy, typer... whether the suite runs in a venv or
    not, and dh-mlx comes only from the wheel."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO_DIR, src, ignore=_NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("dh_mlx-*.whl")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    outside = root / "elsewhere"
    outside.mkdir()
    return wheel, target, outside


def test_the_wheel_carries_the_presets_tokenizer_and_corpus(installed):
    names = set(zipfile.ZipFile(installed[0]).namelist())
    presets = {f"dh_mlx/_bundled/parameters/{p.name}" for p in (REPO_DIR / "parameters").glob("*.json")}
    assert len(presets) == 5 and presets <= names
    assert {"dh_mlx/_bundled/data/train_data.jsonl", "dh_mlx/_bundled/data/tokenizer/tokenizer.model",
            "dh_mlx/_bundled/data/tokenizer/tokenizer.json", "dh_mlx/backend/cpu/native/kernels.cpp",
            "dh_mlx/backend/cpu/blas_shim.c"} <= names


def run(installed, *args, timeout=600):
    """`args` run from a folder outside the repository: "python" is this interpreter, "dh-mlx" the wheel's script."""
    _, target, outside = installed
    command = [sys.executable, *args[1:]] if args[0] == "python" else [str(target / "bin" / args[0]), *args[1:]]
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run(command, cwd=outside, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr
    return r


def test_the_installed_package_is_the_wheels(installed):
    where = run(installed, "python", "-c", "import dh_mlx, dh_mlx.config as c; print(dh_mlx.__file__); "
                                          "print(c.PARAMETERS_DIR); print(c.DATA_DIR)").stdout.split()
    target = installed[1].resolve()
    assert all(Path(p).resolve().is_relative_to(target) and Path(p).exists() for p in where), where


def test_dh_mlx_runs_outside_the_repository(installed):
    info = run(installed, "dh-mlx", "info", "--params", "5b").stdout
    assert "5.087 B total" in info  # parameters, from parameters/5b.json inside the wheel
    gen = run(installed, "dh-mlx", "generate", "--params", "tiny", "--prompt", "hi", "--max-tokens", "4")
    assert "generation: 4 tokens" in gen.stderr
    train = run(installed, "dh-mlx", "train", "--steps", "2", "--batch-size", "2", "--seq-len", "64",
                "--eval-every", "2", "--save-every", "2")
    out = installed[2] / "runs" / "tiny"
    assert "finished step 2" in train.stderr and "train_data.jsonl" in train.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()


def test_the_dockerfile_installs_the_package_not_the_checkout():
    text = (REPO_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [l for l in text.splitlines() if "pip install" in l and '".[' in l]
    assert installs and not any(" -e " in l or "--editable" in l for l in installs), installs
    assert "cd / && " in installs[0] and "dh-mlx info --params tiny" in installs[0]  # checked outside /app
