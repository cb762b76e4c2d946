"""Broken input is refused with one line naming the file/tensor and what was expected: no traceback."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

from dh_mlx import CheckpointError, load_model
from helpers import make_checkpoint


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dh_mlx.cli", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, needle):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr


@pytest.fixture
def ckpt(tmp_path):
    make_checkpoint(tmp_path / "m")
    return tmp_path / "m"


def rewrite(ckpt, fn):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_listed(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        load_model(ckpt)


def test_unexpected_tensor_is_listed(ckpt):
    rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.extra.weight", t["model.norm.weight"]))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight"):
        load_model(ckpt)


def test_missing_expert_is_named(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts: expected experts 0\.\.7, missing \[5\]"):
        load_model(ckpt)


def test_wrong_shape_names_tensor_and_both_shapes(ckpt):
    rewrite(ckpt, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:10]))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(10,\), config\.json implies \(64,\)"):
        load_model(ckpt)


def test_cli_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    assert_one_line_error(run_cli("generate", "--model", str(ckpt), "--prompt", "x"), "model.safetensors")


def test_cli_missing_config(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path), "--prompt", "x"), "config.json")


def test_cli_invalid_config_value(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["n_group"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("info", "--model", str(ckpt)), "n_group")


def test_cli_unreadable_config(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    assert_one_line_error(run_cli("info", "--model", str(ckpt)), "config.json:1: invalid JSON")


def test_cli_refuses_a_preset_that_cannot_fit_before_allocating():
    r = run_cli("generate", "--params", "500b", "--prompt", "hi")
    assert_one_line_error(r, "500b")
    assert "GiB" in r.stderr and "would fit" in r.stderr


def test_cli_info_json_keys():
    r = run_cli("info", "--params", "5b", "--json")
    data = json.loads(r.stdout)
    assert {"total_params", "active_params", "kv_bytes_per_token"} <= set(data)
    assert 4.5e9 <= data["total_params"] <= 5.5e9
    assert data["kv_references"]["Llama-3.2-3B"]["kv_bytes_per_token"] == 28 * 2 * 8 * 128 * 2
    assert data["cpu"].endswith(f", {os.cpu_count()} cores") and len(data["cpu"]) > len(" cores, 1")
