"""DeepSeek-V4's MTP module, as the release ships it (`mtp.0.*`): its logits equal the reference composed from
transformers' own V4 modules the way DeepSeek's inference code (`MTPBlock`) composes them (transformers 5.25
has no V4 MTP module: it drops `mtp.*` on load); cached MTP equals the full forward; the V4 cache takes back the
last positions exactly (what a rejected draft needs), so MTP drafting gives the plain greedy tokens, from the
library and from `dh-mlx generate`; `dh-mlx info` counts the module."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import load_model

pytest.importorskip("transformers")
from v4_release import CSA, build, build_with_mtp, mtp_reference, prompt, reference  # noqa: E402


@pytest.mark.parametrize("name,mtp_kind", [("flash_like", None), ("pro_default", None), ("csa_only", CSA)])
def test_mtp_logits_equal_the_reference(tmp_path, name, mtp_kind):
    """Both releases' MTP layer is a sliding-window block (the trailing 0 of compress_ratios); a compressed one
    (csa_only: a trailing 4) runs too, its compressor and indexer included."""
    path, deeper, own = build_with_mtp(tmp_path, name, **({} if mtp_kind is None else {"mtp_kind": mtp_kind}))
    ids = prompt(30)
    model = load_model(path, dtype="float32")
    assert model.config.num_nextn_predict_layers == 1 and model.config.mtp_layer_types == [mtp_kind or
                                                                                           "sliding_attention"]
    out = model.forward(mx.array(ids))
    assert np.abs(np.array(out.logits) - reference(path, ids)).max() <= 1e-4  # the main model is unchanged
    got = np.array(model.mtp_forward(out.hidden[:, :-1], mx.array(ids[:, 1:])).logits)
    want = mtp_reference(deeper, own, ids)
    assert np.abs(got - want).max() <= 1e-4 and np.abs(want).max() > 0.1


def test_cached_mtp_equals_the_full_forward(tmp_path):
    """The MTP module over its own cache, as generation runs it: the prompt's entries in prefill chunks, then
    one, two and several positions at a time (the drafter's steps), past the sliding window."""
    from dh_mlx.generation.cache import layer_cache, make_cache
    from dh_mlx.generation.speculative import Drafter
    from dh_mlx.generation.steps import prefill
    model = load_model(build_with_mtp(tmp_path, "flash_like")[0], dtype="float32")
    ids = mx.array(prompt(40, batch=1, seed=2))
    out = model.forward(ids)
    full = np.array(model.mtp_forward(out.hidden[:, :-1], ids[:, 1:]).logits)[0]  # (39, V)
    cache, mtp_cache = make_cache(model.config), layer_cache(model.config)
    prefill(model, ids[:, :14], cache, step_size=5, mtp_cache=mtp_cache)  # MTP entries 0..12
    drafter, t, errors = Drafter(model, None, mtp_cache), 13, []
    for width in (1, 2, 1, 5, 2, 1, 3, 1, 2, 1, 1, 1, 1):
        logits = drafter(out.hidden[:, t:t + width], ids[:, t + 1:t + 1 + width])
        t += width
        errors.append(np.abs(np.array(logits[0]) - full[t - 1]).max())
    assert t == 35 and max(errors) <= 1e-4 and mtp_cache.offset == 35


@pytest.mark.parametrize("name", ["flash_like", "csa_only"])
def test_the_cache_takes_back_its_last_positions(tmp_path, name):
    """Decode one token and one or two more, take the extra ones back, go on: every logit equals the full
    forward's, across the sliding window's evictions and every compressor's window ends (rates 2, 4, 8)."""
    from dh_mlx.generation.cache import make_cache
    from dh_mlx.generation.steps import prefill
    model = load_model(build(tmp_path, name), dtype="float32")
    ids = mx.array(prompt(60, batch=1, seed=1))
    full = np.array(model(ids))[0]
    cache = make_cache(model.config)
    logits, _ = prefill(model, ids[:, :5], cache)
    errors, rng = [np.abs(np.array(logits[0]) - full[4]).max()], np.random.default_rng(0)
    for t in range(5, 60):
        extra = int(rng.integers(1, 3))
        logits = model(mx.concatenate([ids[:, t:t + 1], mx.array(rng.integers(0, 97, (1, extra)))], axis=1), cache)
        errors.append(np.abs(np.array(logits[0, 0]) - full[t]).max())
        assert all(c.trim(extra) == extra for c in cache)
    assert max(errors) <= 1e-4 and cache[0].offset == 60
    assert all(c.states["compressor"].count == 60 // model.config.compress_rate(i)
               for i, c in enumerate(cache) if model.config.compress_rate(i))
    with pytest.raises(ValueError, match="takes back at most its last 2 positions"):
        cache[1].trim(3)
    assert cache[1].trim(60) == 60 and cache[1].offset == 0 and not cache[1].arrays()  # everything: a new one


def test_mtp_drafting_gives_the_plain_greedy_tokens(tmp_path):
    """Drafts accepted and rejected (a rejected one's position taken back from every layer's cache), by default
    and drafting every step; a second turn through the same prompt cache gives a fresh run's tokens."""
    from dh_mlx.generation import GenerationStats, generate_tokens
    from dh_mlx.generation.speculative import DraftPolicy
    from dh_mlx.generation.steps import PromptCache
    model = load_model(build_with_mtp(tmp_path, "flash_like", echo=0.1)[0], dtype="float32")
    ids = prompt(12, batch=1)[0].tolist()
    plain = list(generate_tokens(model, ids, max_tokens=40, mtp=False))
    stats = GenerationStats()
    drafted = list(generate_tokens(model, ids, max_tokens=40, stats=stats, mtp=DraftPolicy(adaptive=False)))
    assert drafted == plain and len(plain) == 40
    assert stats.drafted > 20 and 0 < stats.accepted < stats.drafted  # both outcomes, many times
    again = GenerationStats()
    assert list(generate_tokens(model, ids, max_tokens=40, stats=again)) == plain and again.drafted  # (default)
    pc, second = PromptCache.new(model), prompt(6, 1, 4)[0].tolist()
    reply = list(generate_tokens(model, ids, max_tokens=9, prompt_cache=pc, mtp=DraftPolicy(adaptive=False)))
    turn = list(generate_tokens(model, ids + reply + second, max_tokens=12, prompt_cache=pc, stats=again,
                                mtp=DraftPolicy(adaptive=False)))
    assert reply == plain[:9] and turn == list(generate_tokens(model, ids + reply + second, max_tokens=12, mtp=False))


def test_generate_cli_with_and_without_mtp(tmp_path):
    from helpers import make_bpe_tokenizer
    path = build_with_mtp(tmp_path, "flash_like", echo=0.1, vocab_size=402)[0]
    make_bpe_tokenizer(path, vocab_size=400)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    runs = {flag: subprocess.run([sys.executable, "-m", "dh_mlx.cli", "generate", "--model", str(path), "--prompt",
                                  "the quick brown fox", "--max-tokens", "24", "--dtype", "float32", flag, "--verbose"],
                                 capture_output=True, text=True, env=env) for flag in ("--mtp", "--no-mtp")}
    assert all(r.returncode == 0 for r in runs.values()), runs["--mtp"].stderr
    assert runs["--mtp"].stdout == runs["--no-mtp"].stdout and runs["--mtp"].stdout.strip()
    assert "MTP draft acceptance" in runs["--mtp"].stderr and "MTP draft" not in runs["--no-mtp"].stderr


def test_info_counts_the_mtp_module(tmp_path):
    from mlx.utils import tree_flatten
    from dh_mlx.config import load_config
    from dh_mlx.config_v4 import V4Config
    from dh_mlx.info import format_info, model_info
    path = build_with_mtp(tmp_path, "flash_like")[0]
    info = model_info(load_config(path))
    model = load_model(path, dtype="float32")
    params = tree_flatten(model.parameters())
    mtp = sum(v.size for k, v in params if k.startswith("model.layers.4."))
    assert info["mtp_params"] == mtp > 0 and info["total_params"] == sum(
        v.size for k, v in params if not k.startswith("model.layers.4.") and "tid2eid" not in k)
    flash = model_info(V4Config())  # V4-Flash's shapes: one MTP module, a 256-expert MoE block
    assert round(flash["mtp_params"] / 1e9, 2) == 6.61 and round(flash["mtp_active_params"] / 1e9, 2) == 0.32
    assert "MTP modules       6.610 B (not in the totals above)" in format_info(flash, "V4-Flash")


def test_mtp_tensors_past_the_config_and_missing_ones(tmp_path):
    """A config declaring no MTP module loads the release without its tensors (one warning naming them); a
    transformers save (no mtp.*) loads without MTP (one warning); tensors of a declared module missing are
    named."""
    from safetensors.torch import load_file, save_file
    from dh_mlx.checkpoint.layout import CheckpointError
    path = build_with_mtp(tmp_path, "flash_like")[0]
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.warns(UserWarning, match="MTP module tensors past the 0 config.json declares"):
        assert load_model(path, dtype="float32").config.num_nextn_predict_layers == 0
    (path / "config.json").write_text(json.dumps(config))
    saved = build(tmp_path / "transformers", "flash_like", num_nextn_predict_layers=1)
    assert json.loads((saved / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match="declares 1 MTP module.s. but the checkpoint has none"):
        assert load_model(saved, dtype="float32").config.num_nextn_predict_layers == 0
    tensors = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "mtp.0.e_proj.weight"}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.4.e_proj.weight"):
        load_model(path, dtype="float32")
