"""Import: PyTorch state_dicts, DeepSeek-official names, TorchScript archives (tch-rs .ot) and torch.export .pt2
become our model directory with bit-identical logits; wrong or missing tensors are listed by name."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import make_checkpoint, tokens

torch = pytest.importorskip("torch")

from dh_mlx import load_model  # noqa: E402
from dh_mlx.convert import ConvertError, import_checkpoint  # noqa: E402
from dh_mlx.convert.names import rename  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(checkpoint dir, its tensors on disk as torch, reference logits)."""
    from safetensors.torch import load_file
    root = tmp_path_factory.mktemp("src")
    model = make_checkpoint(root)
    ids = mx.array(tokens())
    return root, load_file(root / "model.safetensors"), np.array(model(ids))


def logits_of(path) -> np.ndarray:
    return np.array(load_model(path)(mx.array(tokens())))


def test_state_dict_pt_round_trip(source, tmp_path):
    src, disk, ref = source
    torch.save(disk, tmp_path / "weights.pt")
    import_checkpoint(tmp_path / "weights.pt", tmp_path / "out", config=src / "config.json")
    assert np.array_equal(logits_of(tmp_path / "out"), ref)
    # the twin's in-memory state_dict (stacked experts), wrapped as training checkpoints often are
    import dh_mlx.torch as twin
    torch.save({"state_dict": twin.load_model(src, dtype="float32").state_dict()}, tmp_path / "twin.bin")
    import_checkpoint(tmp_path / "twin.bin", tmp_path / "out2", config=src)
    assert np.array_equal(logits_of(tmp_path / "out2"), ref)


def official(disk, n_layers):
    """Our tensors under DeepSeek's official inference names (which have no MTP layers)."""
    return {rename(k, "ours", "official"): v for k, v in disk.items()
            if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n_layers)}


def config_without_mtp(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "config.json", cfg["num_hidden_layers"]


def test_official_deepseek_names_from_safetensors(source, tmp_path):
    from safetensors.torch import save_file
    src, disk, ref = source
    config, n = config_without_mtp(src, tmp_path)
    weights = official(disk, n)
    assert "layers.1.ffn.experts.7.w2.weight" in weights and "layers.1.attn.wkv_b.weight" in weights
    assert "layers.0.ffn.w1.weight" in weights and "layers.1.ffn.gate.bias" in weights and "head.weight" in weights
    save_file(weights, tmp_path / "official.safetensors")
    import_checkpoint(tmp_path / "official.safetensors", tmp_path / "out", config=config)
    assert np.array_equal(logits_of(tmp_path / "out"), ref)  # MTP only adds layers; the main stack is the same


class _Holder(torch.nn.Module):
    pass


def torchscript_archive(tensors: dict, path) -> None:
    """A scripted module whose state_dict carries `tensors` under their names, saved with torch.jit.save
    (the archive kind tch-rs writes)."""
    root = _Holder()
    for name, t in tensors.items():
        *path_parts, leaf = name.split(".")
        module = root
        for part in path_parts:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    torch.jit.script(root).save(str(path))


@pytest.mark.parametrize("suffix", [".pt", ".ot"])
def test_torchscript_archive(source, tmp_path, suffix):
    src, disk, ref = source
    torchscript_archive(disk, tmp_path / f"model{suffix}")
    # what the seed's troubleshooting saw: torch.load hands back a module, not a mapping
    assert not hasattr(torch.load(tmp_path / f"model{suffix}", weights_only=False), "items")
    import_checkpoint(tmp_path / f"model{suffix}", tmp_path / "out", config=src / "config.json")
    assert np.array_equal(logits_of(tmp_path / "out"), ref)
    # PyTorch's own loader (it runs the archive's code) only when asked: the same tensors
    import_checkpoint(tmp_path / f"model{suffix}", tmp_path / "trusted", config=src / "config.json", trust_code=True)
    assert np.array_equal(logits_of(tmp_path / "trusted"), ref)


@pytest.mark.slow
def test_torch_export_artifact_carries_its_config(source, tmp_path):
    import dh_mlx.torch as twin
    src, _, ref = source
    twin.export_model(twin.load_model(src, dtype="float32"), tmp_path / "m.pt2", torch.tensor(tokens(4)))
    import_checkpoint(tmp_path / "m.pt2", tmp_path / "out")
    assert np.array_equal(logits_of(tmp_path / "out"), ref)
    import_checkpoint(tmp_path / "m.pt2", tmp_path / "trusted", trust_code=True)
    assert np.array_equal(logits_of(tmp_path / "trusted"), ref)


def test_wrong_and_missing_tensors_are_listed(source, tmp_path):
    from safetensors.torch import save_file
    src, disk, _ = source
    config, n = config_without_mtp(src, tmp_path)
    weights = official(disk, n)
    weights["layers.0.attn.wq_z.weight"] = weights.pop("layers.0.attn.wq_a.weight")
    weights["layers.2.attn.wo.weight"] = weights["layers.2.attn.wo.weight"][:, :-1].contiguous()
    del weights["layers.1.ffn.gate.bias"]
    save_file(weights, tmp_path / "bad.safetensors")
    with pytest.raises(ConvertError) as e:
        import_checkpoint(tmp_path / "bad.safetensors", tmp_path / "out", config=config)
    msg = str(e.value)
    assert "missing tensors: model.layers.0.self_attn.q_a_proj.weight, " \
           "model.layers.1.mlp.gate.e_score_correction_bias" in msg
    assert "unexpected tensors: layers.0.attn.wq_z.weight" in msg
    assert "wrong shapes: model.layers.2.self_attn.o_proj.weight (64, 95)" in msg
    assert not (tmp_path / "out").exists()

    with pytest.raises(ConvertError, match="carries no config"):
        import_checkpoint(tmp_path / "bad.safetensors", tmp_path / "out")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ConvertError, match="expected a state_dict"):
        import_checkpoint(tmp_path / "list.pt", tmp_path / "out", config=config)
    torch.save({"w": _Holder()}, tmp_path / "module.pt")
    with pytest.raises(ConvertError, match="weights_only=True"):
        import_checkpoint(tmp_path / "module.pt", tmp_path / "out", config=config)


def test_cli_import(source, tmp_path):
    from typer.testing import CliRunner

    from dh_mlx.cli import app
    from dh_mlx.config import DATA_DIR
    src, disk, ref = source
    torch.save(disk, tmp_path / "w.pt")
    result = CliRunner().invoke(app, ["convert", "import", "--input", str(tmp_path / "w.pt"), "--config",
                                      str(src / "config.json"), "--out", str(tmp_path / "out"), "--tokenizer",
                                      str(DATA_DIR / "tokenizer")])
    assert result.exit_code == 0, result.output
    assert np.array_equal(logits_of(tmp_path / "out"), ref)
    assert (tmp_path / "out" / "tokenizer.model").is_file()
