"""Quantizing as a checkpoint is read (`dh-mlx quantize`, `dh-mlx convert mlx`, `load_model(bits=...)`): one
decoder layer in memory at a time, the same files and model as quantizing the loaded float model, the memory
guard counting the quantized size, and mlx-lm loading the output of the release layouts with our logits."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dh_mlx.checkpoint.weights as weights
from dh_mlx import load_model, random_model, save_model
from dh_mlx.checkpoint.layout import safetensors_files
from dh_mlx.convert.mlx import dir_bytes, quantize
from dh_mlx.quant import QuantConfig, bits_per_weight, quantize_model
from helpers import make_checkpoint, make_config, make_fp8, tokens

WIDE = dict(hidden_size=64, moe_intermediate_size=64, intermediate_size=128, kv_lora_rank=64)


def tensors(d) -> dict[str, np.ndarray]:
    out = {}
    for f in safetensors_files(d):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A float32 checkpoint in several shards, and its FP8 release form."""
    root = tmp_path_factory.mktemp("streaming")
    model = make_checkpoint(root / "one", **WIDE)
    save_model(model, root / "float", max_shard_bytes=60_000)
    assert len(safetensors_files(root / "float")) > 3
    make_fp8(root / "float", root / "fp8", root / "deq")
    return root


@pytest.mark.parametrize("recipe", ["uniform", "mixed"])
def test_streaming_writes_what_quantizing_the_loaded_model_writes(sharded, tmp_path, recipe):
    summary = quantize(sharded / "float", tmp_path / "s", bits=4, group_size=32, recipe=recipe,
                       max_shard_bytes=30_000)
    m = load_model(sharded / "float", dtype="float32")
    quantize_model(m, QuantConfig(4, 32, recipe))
    save_model(m, tmp_path / "whole")
    a, b = tensors(tmp_path / "s"), tensors(tmp_path / "whole")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    assert (json.loads((tmp_path / "s" / "config.json").read_text())
            == json.loads((tmp_path / "whole" / "config.json").read_text()))
    assert summary["bits_per_weight"] == pytest.approx(bits_per_weight(m), rel=1e-12)
    assert len(safetensors_files(tmp_path / "s")) > 1  # written shard by shard, with an index


def test_loading_with_bits_is_loading_the_quantized_copy(sharded, tmp_path):
    ids = mx.array(tokens())
    for src in ("float", "fp8"):
        quantize(sharded / src, tmp_path / src, bits=4, group_size=32, dtype="float32")  # the CPU's dtype
        on_load = load_model(sharded / src, bits=4, group_size=32)
        assert mx.array_equal(on_load(ids), load_model(tmp_path / src)(ids)).item()
        assert on_load.config.extra["quantization"]["bits"] == 4
    # FP8 is dequantized first: its 4-bit model is the 4-bit model of the float weights FP8 stands for
    assert mx.array_equal(load_model(sharded / "fp8", bits=4, group_size=32)(ids),
                          load_model(sharded / "deq", bits=4, group_size=32)(ids)).item()


def test_the_memory_guard_counts_the_size_after_quantizing_on_load(sharded, monkeypatch):
    config = load_model(sharded / "float").config
    q4 = weights.load_bytes(config, mx.float32, qc=QuantConfig(4, 32))
    assert q4 < weights.load_bytes(config, mx.float32) / 2
    mx.clear_cache()
    before = mx.get_active_memory()  # what earlier tests left alive in this process
    mx.reset_peak_memory()
    load_model(sharded / "float", bits=4, group_size=32)
    assert mx.get_peak_memory() - before <= q4  # the estimate holds what loading takes
    for room, fits in ((q4 / 0.9 + 1, True), (q4 / 0.9 - 1, False)):
        monkeypatch.setattr(weights, "available_memory", lambda: int(room))
        with pytest.raises(MemoryError, match="`bits=4`"):
            load_model(sharded / "float")  # float32 does not fit
        if fits:
            assert load_model(sharded / "float", bits=4, group_size=32).config.extra["quantization"]["bits"] == 4
        else:
            with pytest.raises(MemoryError, match="at 4 bits"):
                load_model(sharded / "float", bits=4, group_size=32)


PEAK = r"""
import json, sys
from dh_mlx.checkpoint import weights
from dh_mlx.convert.mlx import quantize
import mlx.core as mx
mx.eval(mx.ones(4) + 1)
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again at the current size
before = status("VmRSS")
src, out, how = sys.argv[1:]
if how == "stream":
    quantize(src, out, bits=4, dtype="float32", max_shard_bytes=16 << 20)
else:  # what quantizing used to be: the float model loaded whole
    from dh_mlx.quant import QuantConfig, quantize_model
    m = weights.load_model(src, dtype="float32")
    quantize_model(m, QuantConfig(4))
    weights.save_model(m, out)
print(json.dumps({"held": status("VmHWM") - before}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quantizing_holds_one_layer_not_the_model(tmp_path):
    """A 240 MB bfloat16 checkpoint in 64 MB shards: quantizing it adds well under a quarter of its size to
    the process's resident memory; loading it whole (the float32 model) adds more than its size."""
    config = make_config(hidden_size=512, moe_intermediate_size=512, intermediate_size=1024, num_hidden_layers=8,
                         kv_lora_rank=128, q_lora_rank=256, n_routed_experts=16, vocab_size=4096,
                         num_attention_heads=8, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    save_model(random_model(config, dtype="float32"), tmp_path / "src", dtype="bfloat16",
               max_shard_bytes=64 << 20)
    size = dir_bytes(tmp_path / "src")
    assert size > 200e6 and len(safetensors_files(tmp_path / "src")) >= 4

    def held(how: str) -> int:
        r = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "src"), str(tmp_path / how), how],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["held"]

    streamed, whole = held("stream"), held("whole")
    assert streamed < 0.25 * size, (streamed, size)
    assert whole > size  # the measure tells the two apart
    ids = mx.array(tokens(vocab=4096))
    assert mx.array_equal(load_model(tmp_path / "stream")(ids), load_model(tmp_path / "whole")(ids)).item()


def release(root, kind: str):
    """A DeepSeek-V3 release layout (bf16 shards with an index, or those shards in FP8) or a V2-Lite one."""
    from helpers import CASES, release as bf16_release
    if kind == "v3_fp8":
        bf16_release(root / "bf16", **{**CASES["v3_bf16"], "overrides": WIDE})
        return make_fp8(root / "bf16", root / "fp8", root / "deq")[0]
    return bf16_release(root / kind, **{**CASES[kind], "overrides": {**CASES[kind]["overrides"], **WIDE}})


@pytest.mark.parametrize("kind", ["v3_fp8", "v3_bf16", "v2_lite"])
def test_convert_mlx_gives_mlx_lm_our_logits_on_the_release_layouts(tmp_path, kind):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    pytest.importorskip("transformers")  # test_releases builds the layouts
    src = release(tmp_path, kind)
    summary = quantize(src, tmp_path / "mlx", bits=4, group_size=32, mtp=False)
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and "quant_method" not in config["quantization_config"]
    assert summary["bytes"] < 0.6 * summary["source_bytes"]
    ours = load_model(tmp_path / "mlx")
    theirs, _ = mlx_lm_utils.load_model(tmp_path / "mlx")
    theirs.set_dtype(mx.float32)  # the stored bfloat16 scales, computed in float32 as ours are on the CPU
    ids = mx.array(tokens(n=24))
    assert mx.abs(ours(ids) - theirs(ids)).max().item() <= 1e-4


@pytest.mark.slow
def test_cli_convert_mlx_and_generate_with_bits(tmp_path):
    from helpers import cli, model_with_tokenizer
    (tmp_path / "tok").mkdir()
    tok = model_with_tokenizer(tmp_path / "tok")
    make_checkpoint(tmp_path / "float", vocab_size=400, **WIDE)
    src = make_fp8(tmp_path / "float", tmp_path / "fp8", tmp_path / "deq")[0]
    weights.copy_tokenizer(tok, src)
    r = cli("convert", "mlx", "--model", str(src), "--bits", "8", "--group-size", "32", "--out", str(tmp_path / "q8"))
    assert r.returncode == 0 and "bits per weight" in r.stderr, r.stderr
    assert "keeps the MTP layers (for MTP drafting); mlx-lm loads a copy written with --no-mtp" in r.stderr
    assert (tmp_path / "q8" / "tokenizer.model").is_file()
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8
    quantize(src, tmp_path / "q4", bits=4, group_size=32, dtype="float32")
    texts = []
    for model, bits in ((src, ["--bits", "4", "--group-size", "32"]), (tmp_path / "q4", []), (src, [])):
        g = cli("generate", "--model", str(model), *bits, "--prompt", "hello", "--max-tokens", "12", "--no-mtp")
        assert g.returncode == 0 and "generation: 12 tokens" in g.stderr, g.stderr
        texts.append(g.stdout)
    assert texts[0] == texts[1] != texts[2]  # --bits 4 is the 4-bit model, not the FP8 one


def test_an_interrupted_write_leaves_no_model_and_a_rerun_completes(sharded, tmp_path, monkeypatch):
    from dh_mlx.checkpoint import streaming
    calls = {"n": 0}
    store = streaming.QuantizedStream._store

    def failing(self, name, v, out):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        store(self, name, v, out)

    monkeypatch.setattr(streaming.QuantizedStream, "_store", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize(sharded / "float", tmp_path / "q", bits=4, group_size=32, max_shard_bytes=30_000)
    left = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert left and all(n.startswith(".tmp-shard-") for n in left)  # nothing a reader would take for a model
    monkeypatch.setattr(streaming.QuantizedStream, "_store", store)
    quantize(sharded / "float", tmp_path / "q", bits=4, group_size=32, max_shard_bytes=30_000)  # no --force
    assert not [p for p in (tmp_path / "q").iterdir() if p.name.startswith(".tmp-")]
    ids = mx.array(tokens())
    assert mx.array_equal(load_model(tmp_path / "q")(ids), load_model(sharded / "float", bits=4, group_size=32)(ids)).item()


def test_tensors_that_are_not_float_are_refused_by_name(sharded, tmp_path):
    import shutil
    from dh_mlx import CheckpointError
    d = tmp_path / "m"
    shutil.copytree(sharded / "fp8", d)
    config = json.loads((d / "config.json").read_text())
    del config["quantization_config"]  # FP8 bytes without the block that says what they are
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor model\.\S+ has dtype F8_E4M3; expected float32"):
        quantize(d, tmp_path / "q")
    shutil.rmtree(d)
    shutil.copytree(sharded / "fp8", d)  # an FP8 weight whose scale is missing
    from safetensors import torch as st
    for f in safetensors_files(d):
        t = st.load_file(str(f))
        gone = [k for k in t if k.endswith("down_proj.weight_scale_inv")][:1]
        if gone:
            st.save_file({k: v for k, v in t.items() if k != gone[0]}, str(f))
            index = json.loads((d / "model.safetensors.index.json").read_text())
            del index["weight_map"][gone[0]]
            (d / "model.safetensors.index.json").write_text(json.dumps(index))
            break
    with pytest.raises(CheckpointError, match=f"tensor {gone[0][:-len('_scale_inv')]} has dtype F8_E4M3 without"):
        quantize(d, tmp_path / "q")
    shutil.rmtree(d)
    shutil.copytree(sharded / "float", d)
    f = safetensors_files(d)[0]
    t = load_file(str(f))
    name = sorted(t)[0]
    t[name] = t[name].astype(np.int32)
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=f"tensor {name} has dtype I32"):
        load_model(d, bits=4)
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())
