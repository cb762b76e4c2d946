"""DeepSeek-V4 (`deepseek_v4`): random checkpoints that transformers builds and saves, over several attention
schedules (sliding / CSA / HCA layers, hash-routed and top-k MoE layers): our logits equal transformers'
(float32), prompts past the sliding window, several compression windows and index_topk; cached decoding equals
the full forward; the release's own names, config keys and FP8 block scales (float or UE8M0) load."""

import json

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import load_model
from dh_mlx.config import load_config

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from v4_release import (CSA, HCA, SCHEDULES, SHAPES, SLIDE, build, build_with_mtp, mtp_reference,  # noqa: E402
                        prompt, reference)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_logits_equal_transformers(tmp_path, name):
    path = build(tmp_path, name)
    ids = prompt()
    want = reference(path, ids)
    model = load_model(path, dtype="float32")
    assert np.abs(np.array(model(mx.array(ids))) - want).max() <= 1e-4 and np.abs(want).max() > 0.1
    kinds = model.config.layer_types
    assert CSA in kinds and (name == "csa_only" or HCA in kinds)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flash_like", "pro_default"])
def test_cached_decoding_equals_the_full_forward(tmp_path, name):
    """Prefill in chunks (a window left unfinished between them), then one token at a time past several
    windows of every compressor and the sliding window's eviction."""
    from dh_mlx.generation.cache import make_cache
    from dh_mlx.generation.steps import decode_step, prefill
    model = load_model(build(tmp_path, name), dtype="float32")
    ids = mx.array(prompt(70, batch=1, seed=1))
    full = np.array(model(ids))[0]
    for first, chunk in ((13, 5), (1, 1), (40, 16)):
        cache = make_cache(model.config)
        logits, _ = prefill(model, ids[:, :first], cache, step_size=chunk)
        errors = [np.abs(np.array(logits[0]) - full[first - 1]).max()]
        for t in range(first, ids.shape[1]):
            logits, _ = decode_step(model, ids[:, t:t + 1], cache)
            errors.append(np.abs(np.array(logits[0]) - full[t]).max())
        assert max(errors) <= 1e-4
    for i, c in enumerate(cache):  # every finished window emitted; 7 (= W - 1) keys in each window
        rate = model.config.compress_rate(i)
        assert (rate == 0 or c.states["compressor"].count == 70 // rate) and c.window.shape[2] == 7


FP8_LINEARS = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "w1", "w2", "w3", "e_proj", "h_proj")


def release_layout(src, dst, fp8: str | None = None):
    """`src` (`build_with_mtp`'s) under DeepSeek's release names and config keys: no `model.` prefix,
    `embed`/`head`/`hc_head_fn`, `compress_ratios` (the MTP layer's entry last), `num_hash_layers`,
    `qk_rope_head_dim`. With `fp8` ("float" or "ue8m0") the linears are FP8 e4m3 with 128 x 128 block scales
    under `.scale` (float32, or UE8M0 exponent bytes: powers of two); returns (that directory, the same release
    in float with the values the FP8 stands for)."""
    from safetensors.torch import load_file, save_file
    tensors, out, deq = load_file(str(src / "model.safetensors")), {}, {}
    for k, v in tensors.items():
        k = k[len("model."):] if k.startswith("model.") else k
        k = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
             "hc_head.hc_scale": "hc_head_scale"}.get(k, k)
        out[k] = deq[k] = v
        if fp8 and v.ndim == 2 and k.endswith(".weight") and k.rsplit(".", 2)[-2] in FP8_LINEARS:
            rows, cols = v.shape
            pr, pc = -(-rows // 128) * 128, -(-cols // 128) * 128
            blocks = torch.zeros(pr, pc).index_put_((torch.arange(rows)[:, None], torch.arange(cols)), v)
            blocks = blocks.reshape(pr // 128, 128, pc // 128, 128)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            if fp8 == "ue8m0":
                scale = torch.exp2(torch.ceil(torch.log2(scale)))
            q = (blocks / scale[:, None, :, None]).reshape(pr, pc)[:rows, :cols].to(torch.float8_e4m3fn)
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
            out[k], deq[k] = q, q.float() * full
            out[k[:-len("weight")] + "scale"] = scale.to(torch.float8_e8m0fnu) if fp8 == "ue8m0" else scale
    config = json.loads((src / "config.json").read_text())
    ratios = {"sliding_attention": 0, CSA: 4, HCA: 128}
    config.update(compress_ratios=[ratios[t] for t in config.pop("layer_types")] + [0],
                  compress_rate_hca=config.pop("compress_rates")[HCA], num_hash_layers=2,
                  qk_rope_head_dim=int(config["head_dim"] * config.pop("partial_rotary_factor")))
    for key in ("mlp_layer_types", "rope_parameters"):
        config.pop(key)
    for d, tensors, quant in ((dst, out, fp8), (dst.parent / (dst.name + "-float"), deq, None)):
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        extra = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                         "scale_fmt": quant}} if quant else {}
        (d / "config.json").write_text(json.dumps({**config, **extra}))
    return dst, dst.parent / (dst.name + "-float")


@pytest.mark.parametrize("fp8", [None, "float", "ue8m0"])
def test_the_release_layout_and_its_fp8_scales(tmp_path, fp8):
    """DeepSeek's names and older config keys give the model transformers builds from them, with the MTP module
    (its layer a sliding-window block, compress_ratios' last entry); FP8 weights give the logits of the float
    weights they stand for (`.scale` blocks as float32 or as UE8M0 exponent bytes), the MTP module's too."""
    from dh_mlx.checkpoint.layout import read_safetensors_header
    src, deeper, own = build_with_mtp(tmp_path / "src", "flash_like")
    dst, float_copy = release_layout(src, tmp_path / "release", fp8)
    header = read_safetensors_header(dst / "model.safetensors")
    assert "embed.weight" in header and "layers.1.ffn.experts.0.w1.weight" in header
    assert "mtp.0.hc_head_fn" in header and "mtp.0.ffn.experts.0.w1.weight" in header
    if fp8:
        assert header["layers.1.attn.wq_a.weight"]["dtype"] == "F8_E4M3"
        assert header["layers.1.attn.wq_a.scale"]["dtype"] == ("F8_E8M0" if fp8 == "ue8m0" else "F32")
        assert header["mtp.0.e_proj.weight"]["dtype"] == "F8_E4M3" and "mtp.0.e_proj.scale" in header
    config = load_config(dst)
    assert config.layer_types == SCHEDULES["flash_like"]["layer_types"] and config.compress_rate(2) == 8
    assert config.mtp_layer_types == [SLIDE] and config.mtp_mlp_layer_types == ["moe"]
    ids = mx.array(prompt())
    got, want = (_with_mtp(load_model(d, dtype="float32"), ids) for d in (dst, float_copy))
    assert all(np.abs(a - b).max() <= 1e-5 for a, b in zip(got, want))
    if fp8 is None:  # the release names are the model transformers saved, and the MTP module DeepSeek's
        assert np.abs(got[0] - reference(src, prompt())).max() <= 1e-4
        assert np.abs(got[1] - mtp_reference(deeper, own, prompt())).max() <= 1e-4


def _with_mtp(model, ids):
    out = model.forward(ids)
    return np.array(out.logits), np.array(model.mtp_forward(out.hidden[:, :-1], ids[:, 1:]).logits)


def test_info_gives_the_caches_bytes_per_token(tmp_path):
    from mlx.utils import tree_flatten
    from dh_mlx.info import format_info, model_info
    path = build(tmp_path, "flash_like")
    config = load_config(path)
    info = model_info(config)
    # CSA layers 1 and 3: (head_dim 32 + index_head_dim 16) / 4; HCA layer 2: 32 / 8; bf16
    assert info["kv_bytes_per_token"] == round((2 * 48 / 4 + 32 / 8) * 2)
    assert info["kv_window_bytes"] == 4 * 8 * 32 * 2
    model = load_model(path, dtype="float32")
    assert info["total_params"] == sum(v.size for k, v in tree_flatten(model.parameters()) if "tid2eid" not in k)
    assert "sliding windows, 2.0 KiB at any length" in format_info(info, "v4")


def test_generation_decodes_greedily_and_gguf_refuses_by_name(tmp_path):
    from dh_mlx.convert.gguf import export_gguf
    from dh_mlx.generation import generate_tokens
    path = build(tmp_path / "m", "flash_like")
    model = load_model(path, dtype="float32")
    ids = prompt(12, batch=1)[0].tolist()
    tokens = list(generate_tokens(model, ids, max_tokens=6))
    seq = list(ids)
    for _ in range(6):
        seq.append(int(np.argmax(np.array(model(mx.array([seq])))[0, -1])))
    assert tokens == seq[len(ids):]
    with pytest.raises(ValueError, match="convert gguf: llama.cpp has no deepseek_v4 architecture"):
        export_gguf(path, tmp_path / "m.gguf")


def test_the_readme_row_is_dh_mlx_info_of_v4_flash(tmp_path):
    """transformers' DeepseekV4Config defaults are V4-Flash's shapes: 284 B parameters (13.8 B active)."""
    from pathlib import Path
    from dh_mlx.config import REPO_DIR
    from dh_mlx.config_v4 import V4Config
    from dh_mlx.info import model_info
    info = model_info(V4Config())
    assert round(info["total_params"] / 1e9) == 284 and round(info["active_params"] / 1e9, 1) == 13.8
    row = [r for r in Path(REPO_DIR / "README.md").read_text().splitlines() if r.startswith("| DeepSeek-V4-Flash")]
    assert f"| {info['weight_bytes']['4-bit'] / 2**30:.0f} GiB |" in row[0] and "284 B" in row[0]


@pytest.mark.parametrize("field,value,needle", [
    ("hc_mult", 10**6, "'hc_mult' must be an integer from 1 to 64"),
    ("num_key_value_heads", 2, "'num_key_value_heads' must be 1"),
    ("layer_types", ["global"] * 4, "'layer_types' must be a list of 4 entries"),
    ("compress_ratios", [0, 4, 64, 4], "'compress_ratios' must be a list of \\[0, 4, 128\\]"),
    ("o_groups", 3, "'o_groups' must be a divisor"),
    ("scoring_func", "relu", "'scoring_func' must be one of"),
    ("num_nextn_predict_layers", -1, "'num_nextn_predict_layers' must be an integer from 0 to 16"),
    ("mtp_layer_types", ["global"], "'mtp_layer_types' must be a list of entries from"),
])
def test_invalid_v4_configs_name_the_field(tmp_path, field, value, needle):
    (tmp_path / "config.json").write_text(json.dumps({**SHAPES, field: value, "model_type": "deepseek_v4"}))
    with pytest.raises(ValueError, match=needle):
        load_config(tmp_path)


def test_a_conversation_prefills_again_each_turn(tmp_path):
    """The V4 cache cannot drop the last position a prompt cache would recompute: a second turn starts a fresh
    cache, and its reply is what a fresh run of the whole conversation gives."""
    from dh_mlx.generation import generate_tokens
    from dh_mlx.generation.steps import PromptCache
    model = load_model(build(tmp_path, "flash_like"), dtype="float32")
    first, second = prompt(10, 1, 3)[0].tolist(), prompt(6, 1, 4)[0].tolist()
    pc = PromptCache.new(model)
    reply = list(generate_tokens(model, first, max_tokens=3, prompt_cache=pc))
    again = list(generate_tokens(model, first + reply + second, max_tokens=4, prompt_cache=pc))
    assert again == list(generate_tokens(model, first + reply + second, max_tokens=4))
