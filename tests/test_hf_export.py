"""HF/vLLM export: transformers' DeepseekV3ForCausalLM and AutoTokenizer load the directory and agree with us."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from helpers import make_checkpoint, tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dh_mlx import load_model  # noqa: E402
from dh_mlx.config import DATA_DIR  # noqa: E402
from dh_mlx.convert import ConvertError, export_hf  # noqa: E402
from dh_mlx.tokenizer import load_tokenizer  # noqa: E402

TOL = 1e-4
TEXTS = ["Hello world", "def f(x):\n\treturn x ** 2  # 1234\n", "émoji 😀 and 中文", " two  spaces"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint with the bundled tokenizer (vocab 8192), exported in shards of ~200 kB."""
    root = tmp_path_factory.mktemp("hf")
    ours = make_checkpoint(root / "ckpt", vocab_size=8192)
    for f in (DATA_DIR / "tokenizer").iterdir():
        shutil.copy(f, root / "ckpt" / f.name)
    export_hf(root / "ckpt", root / "hf", max_shard_bytes=2_000_000)
    return ours, root / "ckpt", root / "hf"


def test_transformers_loads_the_directory_with_our_logits(exported):
    ours, _, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = tokens(vocab=8192)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    diff = np.abs(np.array(ours(mx.array(ids))) - ref).max()
    print(f"transformers vs ours: max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_directory_layout_and_configs(exported):
    _, src, out = exported
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert f"model.layers.{n}.eh_proj.weight" in index["weight_map"]  # MTP, where vLLM's loader reads it
    assert f"model.layers.{n}.embed_tokens.weight" in index["weight_map"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    for key in ("scoring_func", "topk_method", "n_group", "topk_group", "q_lora_rank", "kv_lora_rank",
                "qk_rope_head_dim", "rope_scaling", "routed_scaling_factor", "norm_topk_prob"):
        assert key in cfg
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["torch_dtype"] == "float32"
    gen = json.loads((out / "generation_config.json").read_text())
    tok = load_tokenizer(src)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert gen["do_sample"] is False and cfg["eos_token_id"] == tok.eos_id
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file()
    assert load_model(out)(mx.array(tokens(vocab=8192))).shape == (2, 12, 8192)  # and we read it back


def test_autotokenizer_gives_our_ids(exported):
    _, src, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(src)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == ours.encode(text, bos=True)
        assert hf_tok.decode(ours.encode(text)) == text


def test_no_mtp_and_dtype(exported, tmp_path):
    _, src, _ = exported
    export_hf(src, tmp_path / "out", mtp=False, dtype="bfloat16")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0 and cfg["torch_dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", "np") as f:
        assert not any(k.startswith(f"model.layers.{cfg['num_hidden_layers']}.") for k in f.keys())
    from dh_mlx.outputs import OutputError
    with pytest.raises(OutputError, match="is, or holds, the input"):
        export_hf(src, src)
    with pytest.raises(ConvertError, match="dtype 'int8'"):
        export_hf(src, tmp_path / "x", dtype="int8")


def test_cli(exported, tmp_path):
    from typer.testing import CliRunner

    from dh_mlx.cli import app
    _, src, _ = exported
    result = CliRunner().invoke(app, ["convert", "hf", "--model", str(src), "--out", str(tmp_path / "o"),
                                      "--no-mtp"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_an_export_vllm_would_refuse_says_so(exported, tmp_path):
    import io

    from dh_mlx.progress import show_progress
    _, src, _ = exported
    shown = io.StringIO()
    show_progress(shown)
    try:
        export_hf(src, tmp_path / "out")  # the test checkpoint's head: 32 + 8 = 40
        assert "MLA head 40 (kv_lora_rank + qk_rope_head_dim): transformers loads the export, vLLM's MLA kernels " \
               "refuse it (they take 576, 512, 320)" in shown.getvalue()
    finally:
        show_progress()
