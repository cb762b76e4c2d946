"""Hub ids resolve through the huggingface_hub cache with no request; a string that looks like a local path never
reaches the hub (an unreachable endpoint proves it)."""

import pytest
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import cli, model_with_tokenizer


@pytest.mark.slow
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
    for path in ("runs/tiny-typo", "/no/such/model", "~/no-such-model-dir/x"):
        r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "generate", "--model", path, "--prompt", "hi"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **env})
        assert r.returncode == 1 and f"{Path(path)}: no such model directory" in r.stderr, (path, r.stderr)


def test_a_partial_cache_entry_is_not_taken_for_the_model(tmp_path):
    """A cache holding only a repo's config.json (what a config lookup leaves) is no model: the download is
    tried (and fails here, the endpoint being unreachable) instead of loading an empty directory."""
    snapshot = tmp_path / "hub" / "models--acme--partial" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "build").mkdir()
    shutil.copyfile(model_with_tokenizer(tmp_path / "build") / "config.json", snapshot / "config.json")
    (tmp_path / "hub" / "models--acme--partial" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--partial" / "refs" / "main").write_text("b" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    r = cli("generate", "--model", "acme/partial", "--prompt", "hi", env=env)
    assert r.returncode == 1 and "hub download failed" in r.stderr, r.stderr
