"""DeepSeek-V4 through the commands besides generate/chat/info: `quantize` / `convert mlx` / `--bits` (our
quantized directory loads back with the logits of the float model whose matrices are the values the packed
ones stand for), `convert hf` (transformers loads the release layout we write, with our logits), LoRA and
QLoRA (the loss falls; `fuse` gives the adapted model's logits), and the one refusal left (GGUF)."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import load_model

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from v4_release import build, build_with_mtp, prompt, reference  # noqa: E402


def fake_quantized(float_dir, quantized):
    """The float model with every matrix `quantized` packed replaced by the values it stands for."""
    ref = load_model(float_dir, dtype="float32")
    packed = dict(quantized.named_modules())
    ref.load_weights([(p + ".weight", mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits))
                      for p, _ in ref.named_modules() if "scales" in (q := packed.get(p, {}))], strict=False)
    return ref


# relative mean logit error vs the float model: expert and top-k entry choices flip near their boundaries
TOLERANCE = {8: 0.05, 4: 0.35}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_writes_a_v4_directory_that_loads_back(tmp_path, bits):
    from dh_mlx.convert.mlx import quantize
    src = build(tmp_path / "m", "flash_like")
    summary = quantize(src, tmp_path / "q", bits=bits)
    assert summary["bytes"] < 0.5 * summary["source_bytes"]  # float32 source
    # what stays float: the routers, the indexer's head weights, widths no group size divides (q_lora_rank 48),
    # and the matrices that are no linear's (hyper-connections, compressor position biases)
    for kept in ("mlp.gate x4", "attn_hc.fn x4", "ffn_hc.fn x4", "model.hc_head.hc_fn", "self_attn.q_b_proj x4",
                 "self_attn.compressor.indexer.scorer.weights_proj x2", "self_attn.compressor.position_bias x3"):
        assert kept in summary["kept_float"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4" and config["quantization"]["bits"] == bits
    q = load_model(tmp_path / "q", dtype="float32")
    kinds = {type(m).__name__ for _, m in q.named_modules()}
    assert {"QuantizedLinear", "QuantizedEmbedding", "QuantizedStackedLinear"} <= kinds
    assert q.model.layers[1].self_attn.o_a_proj.bits == bits  # the grouped output projection too
    ids = mx.array(prompt())
    got = np.array(q(ids))
    assert np.abs(got - np.array(fake_quantized(src, q)(ids))).max() <= 1e-5
    want = np.array(load_model(src, dtype="float32")(ids))
    assert np.abs(got - want).mean() / np.abs(want).mean() <= TOLERANCE[bits]
    on_load = load_model(src, dtype="float32", bits=bits)  # generate --bits: quantized as it is read
    assert np.abs(np.array(on_load(ids)) - got).max() == 0


def test_quantized_generation_follows_the_float_model(tmp_path):
    from dh_mlx.generation import generate_tokens
    src = build(tmp_path / "m", "flash_like")
    ids = prompt(12, batch=1, seed=5)[0].tolist()
    tokens = {bits: list(generate_tokens(load_model(src, dtype="float32", bits=bits), ids, max_tokens=8))
              for bits in (None, 8, 4)}
    assert tokens[8] == tokens[None]
    # 4 bits: a random model's logits are nearly flat (max 0.65 here), so one flip changes every later token;
    # along the float model's own greedy text, the 4-bit model still picks its token most of the time
    seq = mx.array([ids + tokens[None]])
    agree = (np.array(load_model(src, dtype="float32", bits=4)(seq)).argmax(-1)
             == np.array(load_model(src, dtype="float32")(seq)).argmax(-1))[0, len(ids) - 1:-1]
    assert tokens[4][0] == tokens[None][0] and agree.mean() >= 0.6


def test_an_fp8_release_with_its_mtp_module_quantizes(tmp_path):
    """FP8 weights (UE8M0 scales) are read as the float values they stand for, the MTP module comes along."""
    from dh_mlx.convert.mlx import quantize
    from test_v4 import _with_mtp, release_layout
    src, _, _ = build_with_mtp(tmp_path / "src", "flash_like")
    fp8, float_copy = release_layout(src, tmp_path / "release", "ue8m0")
    quantize(fp8, tmp_path / "q", bits=8, dtype="float32")  # (default for FP8: bfloat16 scales and floats)
    q = load_model(tmp_path / "q", dtype="float32")
    assert q.config.num_nextn_predict_layers == 1 and q.model.mtp_layers[0].e_proj.bits == 8
    ids = mx.array(prompt())
    got, want = _with_mtp(q, ids), _with_mtp(fake_quantized(float_copy, q), ids)
    assert all(np.abs(a - b).max() <= 1e-5 for a, b in zip(got, want))
    quantize(fp8, tmp_path / "no-mtp", bits=8, mtp=False)
    assert load_model(tmp_path / "no-mtp").config.num_nextn_predict_layers == 0


@pytest.mark.slow  # subprocesses
def test_the_cli_quantizes_and_generates_v4(tmp_path, tokenizer_dir):
    import shutil
    src = build(tmp_path / "m", "flash_like", vocab_size=512)  # the test tokenizer's 400 pieces fit
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", *map(str, args)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout + r.stderr
    out = cli("quantize", "--model", src, "--out", tmp_path / "q", "--bits", "4")
    assert "matrices kept in float: " in out and "mlp.gate x4" in out
    texts = [cli("generate", *where, "--prompt", "the quick brown fox", "--max-tokens", "6", "--temp", "0")
             for where in (("--model", tmp_path / "q"), ("--model", src, "--bits", "4"))]
    assert texts[0].splitlines()[0] == texts[1].splitlines()[0]


def test_convert_hf_writes_the_layout_transformers_saves(tmp_path):
    """transformers' own save and ours have the same tensor names; it loads ours with our logits."""
    from safetensors import safe_open
    from dh_mlx.convert import export_hf
    src = build(tmp_path / "m", "pro_default")
    export_hf(src, tmp_path / "hf")
    names = [set(safe_open(str(d / "model.safetensors"), "np").keys()) for d in (src, tmp_path / "hf")]
    assert names[0] == names[1]
    ids = prompt()
    ours = np.array(load_model(src, dtype="float32")(mx.array(ids)))
    assert np.abs(reference(tmp_path / "hf", ids) - ours).max() <= 1e-4 and np.abs(ours).max() > 0.1


def test_convert_hf_of_an_fp8_release_writes_its_float_values(tmp_path):
    """An FP8 release (UE8M0 scales) with its MTP module: the export holds the float values the FP8 stands for
    (transformers' logits equal ours on the float copy), the MTP module under DeepSeek's `mtp.0.*` (we read it
    back; transformers, which has no MTP, leaves it out)."""
    from dh_mlx.convert import export_hf
    from test_v4 import _with_mtp, release_layout
    src, _, _ = build_with_mtp(tmp_path / "src", "flash_like")
    fp8, float_copy = release_layout(src, tmp_path / "release", "ue8m0")
    export_hf(fp8, tmp_path / "hf", dtype="float32")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 1
    ids = mx.array(prompt())
    want = _with_mtp(load_model(float_copy, dtype="float32"), ids)
    back = _with_mtp(load_model(tmp_path / "hf", dtype="float32"), ids)
    assert all(np.abs(a - b).max() <= 1e-5 for a, b in zip(back, want))
    assert np.abs(reference(tmp_path / "hf", prompt()) - want[0]).max() <= 1e-4
    export_hf(fp8, tmp_path / "no-mtp", mtp=False)  # bfloat16, what FP8 is written back as by default
    config = json.loads((tmp_path / "no-mtp" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["torch_dtype"] == "bfloat16"
    assert np.abs(reference(tmp_path / "no-mtp", prompt()) - want[0]).max() <= 0.05


@pytest.fixture(scope="module")
def v4_with_data(tmp_path_factory, tokenizer_dir):
    import shutil
    from helpers import write_corpus
    root = tmp_path_factory.mktemp("v4lora")
    src = build(root / "m", "flash_like", vocab_size=512)  # the test tokenizer's 400 pieces fit
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    write_corpus(root / "data.jsonl")
    return src, root / "data.jsonl"


LORA = dict(rank=4, steps=6, batch_size=2, seq_len=32, eval_every=100, save_every=100, warmup_steps=1,
            progress=False, lr=2e-2)


@pytest.mark.slow  # compiles V4's training step (~2 min the first time on a 2-core machine)
def test_lora_lowers_the_loss_and_fuses(v4_with_data, tmp_path):
    """LoRA on V4's default targets (q_a_proj, q_b_proj, kv_proj, o_b_proj, shared and routed experts) with
    packed documents masked apart: the validation loss falls (6.26 -> 5.30 measured); the fused directory gives
    the adapted model's logits."""
    from dh_mlx.lora import load_adapters
    from dh_mlx.train.lora_run import fuse, lora
    src, data = v4_with_data
    r = lora(model=src, data=data, out=tmp_path / "ad", **LORA)
    assert r.val_loss < r.val_loss_before - 0.5 and 0 < r.share < 0.2
    keys = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert {"self_attn.kv_proj", "self_attn.o_b_proj", "mlp.switch_mlp.gate_proj"} <= set(keys)
    fuse(model=src, adapter=tmp_path / "ad", out=tmp_path / "fused")
    ids = mx.array(prompt(20, 2, 3))
    adapted = np.array(load_adapters(load_model(src, dtype="float32"), tmp_path / "ad")(ids))
    assert np.abs(np.array(load_model(tmp_path / "fused", dtype="float32")(ids)) - adapted).max() <= 1e-4
    assert np.abs(np.array(load_model(src, dtype="float32")(ids)) - adapted).max() > 0.1  # the adapters matter


@pytest.mark.slow
def test_qlora_on_a_quantized_v4_directory(v4_with_data, tmp_path):
    """QLoRA on `dh-mlx quantize`'s 4-bit V4 with gradient checkpointing, and on a float base quantized as it
    loads (`bits`): the loss falls (6.25 -> 5.27 measured); fused to float it gives the adapted model's logits,
    kept quantized it loads back with the adapted matrices re-quantized."""
    from dh_mlx.convert.mlx import quantize
    from dh_mlx.lora import load_adapters
    from dh_mlx.quant import is_quantized
    from dh_mlx.train.lora_run import fuse, lora
    src, data = v4_with_data
    quantize(src, tmp_path / "q4", bits=4)
    r = lora(model=tmp_path / "q4", data=data, out=tmp_path / "ad", grad_checkpointing=True, **LORA)
    assert r.val_loss < r.val_loss_before - 0.5
    on_load = lora(model=src, bits=4, data=data, out=tmp_path / "ad-bits", **LORA)
    assert abs(on_load.val_loss_before - r.val_loss_before) < 1e-3 and on_load.val_loss < r.val_loss_before - 0.5
    ids = mx.array(prompt(20, 2, 3))
    adapted = np.array(load_adapters(load_model(tmp_path / "q4", dtype="float32"), tmp_path / "ad")(ids))
    fuse(model=tmp_path / "q4", adapter=tmp_path / "ad", out=tmp_path / "fused")
    fused = load_model(tmp_path / "fused", dtype="float32")
    assert not is_quantized(fused) and np.abs(np.array(fused(ids)) - adapted).max() <= 1e-4
    fuse(model=tmp_path / "q4", adapter=tmp_path / "ad", out=tmp_path / "kept", keep_quantized=True)
    kept = load_model(tmp_path / "kept", dtype="float32")
    # the adapted matrices re-quantized: the fused float model with the values the packed matrices stand for
    assert is_quantized(kept) and np.abs(np.array(kept(ids)) - np.array(fake_quantized(tmp_path / "fused", kept)(ids))
                                         ).max() <= 1e-5


def test_v4_document_masking_keeps_packed_documents_apart(tmp_path):
    """Training's document mask: a packed row's second document does not see the first (its keys, nor the
    compressed entries and indexer choices built from it); one document is the causal forward."""
    from dh_mlx.train.loss import document_mask
    model = load_model(build(tmp_path, "flash_like"), dtype="float32")
    ids = prompt(40, 2)
    segments = mx.array([[0] * 13 + [1] * 27, [0] * 30 + [1] * 10])
    other = ids.copy()
    other[0, :13], other[1, :30] = (ids[0, :13] + 5) % 97, (ids[1, :30] + 7) % 97
    mask = document_mask(segments)
    a, b = (np.array(model(mx.array(x), mask=mask)) for x in (ids, other))
    assert np.abs(a[0, 13:] - b[0, 13:]).max() == 0 and np.abs(a[1, 30:] - b[1, 30:]).max() == 0
    assert np.abs(np.array(model(mx.array(other)))[0, 13:] - a[0, 13:]).max() > 0.1  # unmasked, it does
    one = document_mask(mx.zeros((2, 40), mx.int32))
    assert np.abs(np.array(model(mx.array(ids), mask=one)) - np.array(model(mx.array(ids)))).max() == 0


def test_training_from_v4_weights_is_refused_before_the_run_starts(tmp_path):
    from dh_mlx.train.run import train
    src = build(tmp_path / "m", "flash_like")
    with pytest.raises(ValueError, match="training does not take deepseek_v4 models .*lora, fuse"):
        train(init=src, data=tmp_path / "absent.jsonl", out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
