"""GGUF export: llama.cpp (llama-cpp-python) loads our file, tokenizes as we do, and gives our logits and greedy tokens.

Measured here (llama-cpp-python 0.3.36, CPU): float32 GGUF with a float32 KV cache max |diff| ~4e-7 over all
positions and configs; f16 ~4e-4 (top-1 identical); Q8_0 ~7e-2 and Q4_K_M ~9e-2 (random routers flip experts).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

from helpers import make_checkpoint

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from dh_mlx.convert import ConvertError, export_gguf  # noqa: E402
from dh_mlx.tokenizer import load_tokenizer  # noqa: E402
from dh_mlx.train.tokenizer import train_tokenizer  # noqa: E402

VOCAB = 300
TOL_F32 = 1e-4
PROMPT = "the model routes each token to experts 12 + 7 = 19. Café, naïve ½\n"
F32_KV = dict(type_k=0, type_v=0)  # llama.cpp's default f16 KV cache alone costs ~1e-3
# name -> (helpers.CONFIGS entry, overrides)
CASES = {
    "sigmoid+groups+yarn+mtp": ("q_lora+groups+yarn+mtp", {}),
    "no_q_lora+flat+dense0": ("no_q_lora+flat+dense0", {}),
    "dense_first2+k1": ("dense_first2+k1", {}),
    "softmax_greedy": ("softmax_greedy", {}),
    "half_split_rope": ("q_lora+groups+yarn+mtp", dict(rope_interleave=False)),
    "yarn_without_mscale": ("q_lora+groups+yarn+mtp", dict(rope_scaling={
        "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64})),
    "tied_embeddings+domains": ("q_lora+groups+yarn+mtp", dict(tie_word_embeddings=True, domain_routing={
        "domains": ["code", "math"], "experts_per_domain": 3})),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = "the of model token expert router latent attention cache layer value query key routes each".split()
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 25)))
                         + f" {rng.randint(0, 99)} + {rng.randint(0, 99)}. Café, naïve ½\n"}) for _ in range(150)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    train_tokenizer(root / "corpus.jsonl", root / "out", vocab_size=VOCAB)
    return root / "out"


def checkpoint(path, tokenizer_dir, case="sigmoid+groups+yarn+mtp"):
    name, overrides = CASES[case]
    model = make_checkpoint(path, name, vocab_size=VOCAB, **overrides)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return model


def prompt_ids(path) -> list[int]:
    return load_tokenizer(path).encode(PROMPT * 3, bos=True)


def llama(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, verbose=False, **kwargs)


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("case", list(CASES))
def test_float32_gguf_gives_our_logits(tmp_path, tokenizer_dir, case):
    ours = checkpoint(tmp_path / "ckpt", tokenizer_dir, case)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", outtype="f32")
    ids = prompt_ids(tmp_path / "ckpt")
    ref = np.array(ours(mx.array([ids]))[0])
    got = llama_logits(llama(tmp_path / "m.gguf", **F32_KV), ids)
    diff = np.abs(got - ref).max()
    print(f"{case}: {len(ids)} positions, max |llama.cpp - ours| = {diff:.2e}")
    assert diff <= TOL_F32
    assert np.abs(ref).max() > 0.1


def test_tokenizer_and_greedy_generation_match(tmp_path, tokenizer_dir):
    ours = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", outtype="f32")
    llm = llama(tmp_path / "m.gguf", **F32_KV)
    tok = load_tokenizer(tmp_path / "ckpt")
    for text in (PROMPT, "  two spaces\n\tand a tab", "émoji 😀 and 中文", "x"):
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text, bos=True)
        assert llm.detokenize(tok.encode(text)).decode() == text
    ids = tok.encode(PROMPT, bos=True)
    theirs, mine = list(ids), list(ids)
    llm.reset()
    llm.eval(ids)
    for _ in range(20):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(theirs[-1:])
        mine.append(int(mx.argmax(ours(mx.array([mine]))[0, -1]).item()))
    assert theirs == mine


def test_f16_gguf_agrees_within_f16_rounding(tmp_path, tokenizer_dir):
    ours = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", outtype="f16")
    ids = prompt_ids(tmp_path / "ckpt")
    ref = np.array(ours(mx.array([ids]))[0])
    got = llama_logits(llama(tmp_path / "m.gguf", **F32_KV), ids)
    diff, top1 = np.abs(got - ref).max(), (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"f16: max |llama.cpp - ours| = {diff:.2e}, top-1 agreement {top1:.3f}")
    assert diff <= 1e-2 and top1 >= 0.95


def _field(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()


def test_metadata_and_tensors(tmp_path, tokenizer_dir):
    checkpoint(tmp_path / "ckpt", tokenizer_dir, "tied_embeddings+domains")
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", outtype="f16")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    meta = {k: _field(r, k) for k in r.fields if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
    assert meta["general.architecture"] == "deepseek2"
    assert meta["deepseek2.expert_gating_func"] == 2  # sigmoid; llama.cpp would assume softmax without it
    assert (meta["deepseek2.expert_group_count"], meta["deepseek2.expert_group_used_count"]) == (4, 2)
    assert meta["deepseek2.block_count"] == 4 and meta["deepseek2.nextn_predict_layers"] == 1
    assert (meta["deepseek2.attention.key_length_mla"], meta["deepseek2.attention.value_length_mla"]) == (24, 24)
    assert meta["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.07)
    assert meta["darkhorse.domains"] == ["code", "math"] and meta["darkhorse.experts_per_domain"] == 3
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.3.nextn.eh_proj.weight"] == "F16" and types["blk.1.exp_probs_b.bias"] == "F32"
    assert types["blk.1.attn_k_b.weight"] == types["blk.1.attn_v_b.weight"] == "F32"
    shapes = {t.name: list(t.shape) for t in r.tensors}  # GGML order: innermost first
    assert shapes["blk.1.attn_k_b.weight"] == [16, 32, 4]  # [nope, kv_lora_rank, heads]
    assert shapes["blk.1.ffn_gate_exps.weight"] == [64, 32, 8]

    export_gguf(tmp_path / "ckpt", tmp_path / "no_mtp.gguf", outtype="f16", mtp=False)
    r = gguf.GGUFReader(tmp_path / "no_mtp.gguf")
    assert _field(r, "deepseek2.block_count") == 3 and not any("nextn" in t.name for t in r.tensors)
    softmax = tmp_path / "softmax"
    checkpoint(softmax, tokenizer_dir, "softmax_greedy")
    export_gguf(softmax, tmp_path / "s.gguf", outtype="f32")
    r = gguf.GGUFReader(tmp_path / "s.gguf")
    assert _field(r, "deepseek2.expert_gating_func") == 1 and "deepseek2.expert_group_count" not in r.fields


# llama.cpp's AMX / repacked CPU kernels crash (SIGSEGV) on quantized matrices this small on this machine, its own
# quantizer's output included; the evaluation runs in a child process without the extra buffer types.
_EVAL_QUANTIZED = textwrap.dedent("""
    import json, sys
    import numpy as np, llama_cpp
    default = llama_cpp.llama_model_default_params
    def no_extra_buffers():
        p = default(); p.use_extra_bufts = False; return p
    llama_cpp.llama_cpp.llama_model_default_params = no_extra_buffers
    ids, ref = json.loads(sys.argv[1]), np.load(sys.argv[2])
    out = {}
    for path in sys.argv[3:]:
        llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=256, verbose=False, type_k=0, type_v=0)
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
        out[path] = [float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean())]
    print(json.dumps(out))
""")


def test_quantized_outputs(tmp_path, tokenizer_dir):
    ours = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    files = {"q8_0": export_gguf(tmp_path / "ckpt", tmp_path / "q8.gguf", outtype="q8_0"),
             "Q4_K_M": export_gguf(tmp_path / "ckpt", tmp_path / "q4km.gguf", outtype="f32", quantize="Q4_K_M"),
             "Q8_0": export_gguf(tmp_path / "ckpt", tmp_path / "q80.gguf", outtype="f32", quantize="Q8_0")}
    assert not list(tmp_path.glob(".*"))  # the quantizer's input is removed
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files["Q4_K_M"]).tensors}
    assert types["blk.1.ffn_gate_exps.weight"] in ("Q4_K", "Q5_0", "Q8_0")  # K-quants fall back on short rows
    assert types["blk.1.attn_k_b.weight"] == "F32"
    ids = prompt_ids(tmp_path / "ckpt")
    np.save(tmp_path / "ref.npy", np.array(ours(mx.array([ids]))[0]))
    run = subprocess.run([sys.executable, "-c", _EVAL_QUANTIZED, json.dumps(ids), str(tmp_path / "ref.npy"),
                          *map(str, files.values())], capture_output=True, text=True)
    if run.returncode < 0:
        pytest.skip(f"llama.cpp crashed (signal {-run.returncode}) evaluating quantized files on this CPU")
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for kind, path in files.items():
        diff, top1 = results[str(path)]
        print(f"{kind}: max |llama.cpp - ours| = {diff:.2e}, top-1 agreement {top1:.3f}")
        assert top1 >= 0.8 and diff <= 0.5


def test_refusals_name_the_reason(tmp_path, tokenizer_dir, monkeypatch):
    make_checkpoint(tmp_path / "v2", "softmax_group_limited", vocab_size=VOCAB)
    with pytest.raises(ConvertError, match="group_limited_greedy"):
        export_gguf(tmp_path / "v2", tmp_path / "v2.gguf")
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, vocab_size=VOCAB)
    with pytest.raises(ConvertError, match="no tokenizer.model"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    with pytest.raises(ConvertError, match="outtype 'q4'"):
        export_gguf(ckpt, tmp_path / "m.gguf", outtype="q4")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(ConvertError, match="pip install llama-cpp-python"):
        export_gguf(ckpt, tmp_path / "m.gguf", quantize="Q4_K_M")


def test_cli_and_seed_script(tmp_path, tokenizer_dir):
    from typer.testing import CliRunner

    from dh_mlx.cli import app
    checkpoint(tmp_path / "ckpt", tokenizer_dir)
    result = CliRunner().invoke(app, ["convert", "gguf", "--model", str(tmp_path / "ckpt"), "--out",
                                      str(tmp_path / "a.gguf"), "--outtype", "f32"])
    assert result.exit_code == 0, result.output
    script = [sys.executable, "convert/convert_to_gguf.py", "--model-dir", str(tmp_path / "ckpt"), "--out",
              str(tmp_path / "b.gguf"), "--outtype", "f32"]
    from dh_mlx.config import REPO_DIR
    assert subprocess.run(script, cwd=REPO_DIR, capture_output=True).returncode == 0
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
