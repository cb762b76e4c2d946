"""Domains as parts of a model: extract (a plain DeepSeek-V3 giving the full model's logits with that domain's
id, loaded by transformers and mlx-lm), remove (the other domains route as before), `info` listing, and
`--domain auto` (the posterior from the prompt's likelihood under each domain)."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import load_model, random_model, save_model
from dh_mlx.checkpoint.domains import extract_domain
from dh_mlx.domains import domain_experts, extract, remove
from dh_mlx.generation.domains import domain_posterior, infer_domain
from dh_mlx.convert.mlx import dir_bytes
from helpers import make_config, randomise_for_parity, tokens

DOMAINS = {"domains": ["code", "math", "legal"], "experts_per_domain": 3}


def domain_model(seed: int = 1, **overrides):
    config = make_config(**{"n_routed_experts": 12, "n_group": 4, "topk_group": 2, "domain_routing": DOMAINS,
                            **overrides})
    return randomise_for_parity(random_model(config, seed=seed, dtype="float32"), seed)


def ids_for(d: int, batch: int = 2) -> mx.array:
    return mx.array([d] * batch)


def test_experts_of_each_domain():
    assert domain_experts(domain_model().config) == {"code": [0, 1, 2], "math": [3, 4, 5], "legal": [6, 7, 8],
                                                     "common": [9, 10, 11]}


@pytest.mark.parametrize("name", DOMAINS["domains"])
def test_extracted_domain_gives_the_full_models_logits_with_its_id(name):
    m = domain_model()
    e = extract(m, name)
    d = DOMAINS["domains"].index(name)
    assert e.config.domain_routing is None and e.config.n_routed_experts == 6 and e.config.n_group == 1
    ids = mx.array(tokens())
    full, part = m.forward(ids, domain_ids=ids_for(d)), e.forward(ids)
    assert mx.abs(part.logits - full.logits).max().item() <= 1e-6
    assert mx.abs(m(ids) - part.logits).max().item() > 1e-3  # the id matters in the full model
    mtp_full = m.mtp_forward(full.hidden, ids, domain_ids=ids_for(d)).logits
    assert mx.abs(e.mtp_forward(part.hidden, ids).logits - mtp_full).max().item() <= 1e-6  # MTP experts too


@pytest.mark.slow
def test_extracted_checkpoint_loads_in_transformers_and_mlx_lm_with_those_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    m = domain_model()
    save_model(m, tmp_path / "full")
    extract_domain(tmp_path / "full", "math", tmp_path / "math")
    config = json.loads((tmp_path / "math" / "config.json").read_text())
    assert config["n_routed_experts"] == 6 and "domain_routing" not in config
    assert dir_bytes(tmp_path / "math") < 0.8 * dir_bytes(tmp_path / "full")
    ids = tokens()
    want = np.array(m(mx.array(ids), domain_ids=ids_for(1)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "math", dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(hf(torch.tensor(ids)).logits.numpy() - want).max() <= 1e-4
    save_model(load_model(tmp_path / "math"), tmp_path / "math-mlx-lm", mtp=False)
    theirs, _ = mlx_lm_utils.load_model(tmp_path / "math-mlx-lm")
    assert np.abs(np.array(theirs(mx.array(ids))) - want).max() <= 1e-4


def test_removing_a_domain_leaves_the_others_routing_as_before():
    m = domain_model()
    r = remove(m, "math")
    assert r.config.domain_routing.domains == ["code", "legal"] and r.config.n_routed_experts == 9
    assert r.config.n_group == 1  # 9 experts no longer split into 4 groups: plain top-k without an id
    ids = mx.array(tokens())
    for old, new in ((0, 0), (2, 1)):
        assert mx.abs(r(ids, domain_ids=ids_for(new)) - m(ids, domain_ids=ids_for(old))).max().item() <= 1e-6
    with pytest.raises(ValueError, match="unknown domain 'math'"):
        r.config.domain_routing.domain_id("math")
    kept = remove(domain_model(n_routed_experts=15, n_group=3, topk_group=2), "math")
    assert (kept.config.n_routed_experts, kept.config.n_group) == (12, 3)  # groups kept where they still divide


def test_auto_picks_the_domain_the_prompt_is_likeliest_under(tmp_path):
    m = domain_model()
    prompt = tokens(n=16, batch=1)[0].tolist()
    post = domain_posterior(m, prompt)
    # reference: each domain's summed next-token log-likelihood, one forward pass per domain
    ll = []
    for d in range(3):
        logits = m(mx.array([prompt[:-1]]), domain_ids=ids_for(d, 1)).astype(mx.float32)[0]
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ll.append(sum(lp[t, prompt[t + 1]].item() for t in range(len(prompt) - 1)))
    want = np.exp(np.array(ll) - max(ll))
    np.testing.assert_allclose(list(post.values()), want / want.sum(), rtol=1e-4, atol=1e-6)
    best, _ = infer_domain(m, prompt)
    assert best == int(np.argmax(ll))
    assert infer_domain(m, prompt[:1]) == (None, None)  # one token predicts nothing


@pytest.mark.slow
def test_cli_extract_remove_info_and_auto(tmp_path):
    from helpers import model_with_tokenizer
    import shutil
    (tmp_path / "tok").mkdir()
    tok = model_with_tokenizer(tmp_path / "tok")
    config = make_config(n_routed_experts=12, n_group=4, topk_group=2, domain_routing=DOMAINS, vocab_size=400)
    save_model(randomise_for_parity(random_model(config, seed=2, dtype="float32"), 2), tmp_path / "m")
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp_path / "m" / f.name)

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r

    cli("domains", "extract", "--model", str(tmp_path / "m"), "--name", "legal", "--out", str(tmp_path / "legal"))
    cli("domains", "remove", "--model", str(tmp_path / "m"), "--name", "legal", "--out", str(tmp_path / "nolegal"))
    assert (tmp_path / "legal" / "tokenizer.model").is_file()
    assert json.loads((tmp_path / "nolegal" / "config.json").read_text())["domain_routing"]["domains"] == [
        "code", "math"]
    info = json.loads(cli("info", "--model", str(tmp_path / "m"), "--json").stdout)["domain_experts"]
    assert info["domains"]["legal"]["experts"] == [6, 7, 8] and info["common"] == [9, 10, 11]
    from dh_mlx.params import count_params
    p = count_params(load_model(tmp_path / "legal").config)
    assert info["domains"]["legal"]["extracted_params"] == p.total + p.mtp
    a = cli("generate", "--model", str(tmp_path / "m"), "--prompt", "the model routes code", "--max-tokens", "8",
            "--domain", "auto", "--no-mtp")
    name = a.stderr.split("domain auto: ")[1].split()[0]
    b = cli("generate", "--model", str(tmp_path / "m"), "--prompt", "the model routes code", "--max-tokens", "8",
            "--domain", name, "--no-mtp")
    assert name in DOMAINS["domains"] and a.stdout == b.stdout
    # the extracted model without an id writes what the full model writes with that id
    c = cli("generate", "--model", str(tmp_path / "legal"), "--prompt", "the model routes code", "--max-tokens",
            "8", "--no-mtp")
    d = cli("generate", "--model", str(tmp_path / "m"), "--prompt", "the model routes code", "--max-tokens", "8",
            "--domain", "legal", "--no-mtp")
    assert c.stdout == d.stdout
    try:  # llama.cpp runs the extracted model too (plain deepseek2), with the full model's logits for that id
        import llama_cpp
    except ImportError:
        return
    from dh_mlx.convert import export_gguf
    export_gguf(tmp_path / "legal", tmp_path / "legal.gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "legal.gguf"), logits_all=True, n_ctx=64, verbose=False,
                          type_k=0, type_v=0)
    ids = tokens(vocab=400, batch=1)[0].tolist()
    llm.eval(ids)
    want = np.array(load_model(tmp_path / "m")(mx.array([ids]), domain_ids=ids_for(2, 1))[0])
    assert np.abs(np.array(llm.scores[: len(ids)]) - want).max() <= 1e-4


def test_adding_a_domain_trains_only_its_experts(tmp_path):
    import shutil
    from mlx.utils import tree_flatten
    from dh_mlx.train.domain_add import add_domain
    from helpers import model_with_tokenizer
    (tmp_path / "tok").mkdir()
    tok = model_with_tokenizer(tmp_path / "tok")
    config = make_config(n_routed_experts=12, n_group=4, topk_group=2, domain_routing=DOMAINS, vocab_size=400)
    base = randomise_for_parity(random_model(config, seed=2, dtype="float32"), 2)
    save_model(base, tmp_path / "base")
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp_path / "base" / f.name)
    r = add_domain(model=tmp_path / "base", name="poetry", data=tmp_path / "tok" / "data.jsonl",
                   out=tmp_path / "added", steps=16, batch_size=4, seq_len=32, lr=3e-3, eval_every=16,
                   progress=False)
    assert r.after < r.before - 0.1  # the new domain learned
    from dh_mlx.checkpoint.layout import stored_dtype
    assert stored_dtype(tmp_path / "added") == stored_dtype(tmp_path / "base") == "float32"
    new = load_model(tmp_path / "added")
    dr = new.config.domain_routing
    assert (dr.domains, dr.added, new.config.n_routed_experts, new.config.n_group) == (
        DOMAINS["domains"], ["poetry"], 15, 4)
    assert domain_experts(new.config)["poetry"] == [12, 13, 14]
    old, grown = dict(tree_flatten(base.parameters())), dict(tree_flatten(new.parameters()))
    for k, v in old.items():  # every existing weight bit-identical; the new experts' rows changed
        g = grown[k]
        if g.shape != v.shape:
            assert np.array_equal(np.array(g[:12]), np.array(v)), k
            if k.endswith("experts.down_proj.weight"):
                assert not np.array_equal(np.array(g[12:]), np.array(v[9:12]))
        else:
            assert np.array_equal(np.array(g), np.array(v)), k
    ids = mx.array(tokens(vocab=400))
    for d in (None, 0, 1, 2):  # without an id, or with an old one, the model computes what it did
        di = None if d is None else ids_for(d)
        assert mx.abs(new(ids, domain_ids=di) - base(ids, domain_ids=di)).max().item() <= 1e-5
    e = extract(new, "poetry")  # the added domain extracts like any other
    assert mx.abs(e(ids) - new(ids, domain_ids=ids_for(3))).max().item() <= 1e-6
    assert remove(new, "poetry").config.n_routed_experts == 12


def test_alf_leaves_added_experts_alone_and_exports_refuse_an_added_model(tmp_path):
    from dh_mlx.convert import ConvertError, export_hf
    from dh_mlx.convert.gguf import unsupported
    from dh_mlx.domains import add_experts
    from dh_mlx.train.loss import alf_update
    bias, loads = mx.zeros((5,)), mx.array([[3.0, 1.0, 2.0, 0.0, 0.0]])  # experts 3, 4 added: no id-less load
    (new,) = alf_update([bias], loads, 0.1, n_base=3)
    np.testing.assert_allclose(np.array(new), [-0.1, 0.1, 0.0, 0.0, 0.0])
    m = add_experts(domain_model(), "poetry")
    assert m.model.layers[1].mlp.gate.n_base == 12
    assert any("added domains (poetry)" in p for p in unsupported(m.config))
    save_model(m, tmp_path / "added")
    with pytest.raises(ConvertError, match="domains extract"):
        export_hf(tmp_path / "added", tmp_path / "hf")


def test_extract_and_remove_write_the_sources_dtype(tmp_path):
    from dh_mlx.checkpoint.domains import remove_domain
    from dh_mlx.checkpoint.layout import stored_dtype
    m = domain_model()
    save_model(m, tmp_path / "bf16", dtype="bfloat16")
    extract_domain(tmp_path / "bf16", "code", tmp_path / "code")
    remove_domain(tmp_path / "bf16", "code", tmp_path / "rest")
    assert stored_dtype(tmp_path / "code") == stored_dtype(tmp_path / "rest") == "bfloat16"
    ids = mx.array(tokens())
    full = load_model(tmp_path / "bf16")
    assert mx.abs(load_model(tmp_path / "code")(ids) - full(ids, domain_ids=ids_for(0))).max().item() <= 1e-6
