"""Hub ids resolve through the huggingface_hub cache with no request; a string that looks like a local path never
reaches the hub (an unreachable endpoint proves it)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import model_with_tokenizer


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "dh_mlx.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_a_hub_id_loads_from_a_populated_cache_offline(tmp_path):
    snapshot = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / ("a" * 40)
    (tmp_path / "build").mkdir()
    shutil.copytree(model_with_tokenizer(tmp_path / "build"), snapshot)
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = cli("generate", "--model", "acme/tiny-moe", "--prompt", "hello", "--max-tokens", "3", env=env)
    assert r.returncode == 0, r.stderr
    r = cli("generate", "--model", "acme/other", "--prompt", "hi", env=env)
    assert r.returncode == 1 and "not in the Hugging Face cache" in r.stderr


def test_a_local_looking_path_never_reaches_the_hub(tmp_path):
    (tmp_path / "runs").mkdir()
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    for path in ("runs/tiny-typo", "./tiny", "/no/such/model"):
        r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "generate", "--model", path, "--prompt", "hi"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **env})
        assert r.returncode == 1 and f"{Path(path)}: no such model directory" in r.stderr, (path, r.stderr)
