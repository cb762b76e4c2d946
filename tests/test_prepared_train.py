"""Training from prepared shards: exact resume mid-epoch, the raw-JSONL cache reused by --resume, ranks reading
disjoint rows, and domain mixtures (drawn by weight, counted in metrics, resumed exactly)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import write_corpus

from dh_mlx.train.data import DataError
from dh_mlx.train.prepare import cache_root, prepare
from dh_mlx.train.prepared import open_dataset


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixture(small_run_inputs, tmp_path_factory):  # noqa: F811
    """Two prepared corpora (code, math) and a mixture file drawing 3:1 from them."""
    d = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(1)
    for name, words in (("code", ["x", "=", "+", "alpha"]), ("math", ["beta", "gamma", "delta", "y"])):
        with open(d / f"{name}.jsonl", "w") as f:
            for i in range(80):
                f.write(json.dumps({"domain": name, "text": " ".join(rng.choice(words, rng.integers(5, 60)))}) + "\n")
        prepare([d / f"{name}.jsonl"], d / name, small_run_inputs / "tok", progress=False)
    (d / "mix.json").write_text(json.dumps({"code": {"path": "code", "weight": 0.75},
                                            "math": {"path": "math", "weight": 0.25}}))
    return d


def test_resume_mid_epoch_from_prepared_data_gives_the_losses_of_one_run(small_run_inputs, tmp_path):  # noqa: F811
    from dh_mlx.train.run import train
    d = small_run_inputs
    write_corpus(tmp_path / "small.jsonl", n=14)  # a few batches an epoch
    prepare([tmp_path / "small.jsonl"], tmp_path / "prep", d / "tok", progress=False)
    common = dict(config=d / "config.json", data=tmp_path / "prep", tokenizer=d / "tok", steps=8, batch_size=4,
                  seq_len=16, eval_every=4, save_every=100, progress=False, warmup_steps=1)
    full = train(out=tmp_path / "full", **common)
    train(out=tmp_path / "part", stop_after=3, **common)
    state = json.loads(next((tmp_path / "part" / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    per_epoch = len(open_dataset(tmp_path / "prep", _tok(d), seq_len=16).train) // 4
    assert state["data"]["epoch"] == 0 and 0 < state["data"]["index"] < per_epoch < 8  # mid-epoch; 8 steps cross one
    resumed = train(out=tmp_path / "part", resume=True, **common)
    assert full.step == resumed.step == 8
    assert losses(tmp_path / "full") == losses(tmp_path / "part")  # bit-identical
    # the same data from the JSONL itself (prepared into the cache): the same run
    train(out=tmp_path / "raw", **{**common, "data": tmp_path / "small.jsonl"})
    assert losses(tmp_path / "raw") == losses(tmp_path / "full")
    tokens = metrics(tmp_path / "full")[-1]["domain_tokens"]
    assert set(tokens) == {"code", "math"} and sum(tokens.values()) <= 8 * 4 * 17  # (a padded last row)


def _tok(d):
    from dh_mlx.tokenizer import load_tokenizer
    return load_tokenizer(d / "tok")


def test_a_jsonl_is_prepared_once_and_resume_reuses_it(small_run_inputs, tmp_path, capsys, monkeypatch):  # noqa: F811
    from dh_mlx.progress import show_progress
    from dh_mlx.train.run import train
    monkeypatch.setattr("dh_mlx.train.prepare.SMALL", 0)  # (small inputs are prepared silently)
    show_progress()  # status lines to stderr, as the CLI routes them
    d = small_run_inputs
    write_corpus(tmp_path / "fresh.jsonl", n=90)  # contents no other test prepared
    common = dict(config=d / "config.json", data=tmp_path / "fresh.jsonl", tokenizer=d / "tok", steps=4,
                  batch_size=2, seq_len=16, eval_every=2, progress=False, warmup_steps=1)
    train(out=tmp_path / "run", stop_after=2, **common)
    assert capsys.readouterr().err.count("data: preparing 1 file(s)") == 1
    entries = sorted(p.name for p in cache_root().iterdir() if not p.name.startswith("."))
    train(out=tmp_path / "run", resume=True, **common)
    err = capsys.readouterr().err
    assert "preparing" not in err and "data: " in err
    assert sorted(p.name for p in cache_root().iterdir() if not p.name.startswith(".")) == entries


def test_ranks_read_disjoint_rows_whose_union_is_the_global_batch(small_run_inputs, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    from dh_mlx.train.prepared import ShardRows
    d = small_run_inputs
    prepare([d / "data.jsonl"], tmp_path / "prep", d / "tok", progress=False)
    ds = open_dataset(tmp_path / "prep", _tok(d), seq_len=16, seed=2)
    read: list[list[int]] = []
    real = ShardRows.rows
    monkeypatch.setattr(ShardRows, "rows", lambda self, idx: read.append([int(i) for i in idx]) or real(self, idx))
    whole = ds.train_batches(6, seed=2)
    halves = [ds.train_batches(6, seed=2, part=(r, 2)) for r in range(2)]
    for _ in range(7):  # past an epoch (5 batches of 6 rows)
        want = next(whole)
        got = [next(h) for h in halves]
        rows, mine, theirs = read[-3:]
        assert len(mine) == len(theirs) == 3 and not set(mine) & set(theirs) and mine + theirs == rows
        for a, *parts in zip(want, *got):
            assert np.array_equal(a, np.concatenate(parts))
    assert halves[0].tokens_seen() == halves[1].tokens_seen() == whole.tokens_seen()


def test_a_mixture_draws_by_weight_counts_tokens_and_resumes_exactly(small_run_inputs, mixture):  # noqa: F811
    tok = _tok(small_run_inputs)
    ds = open_dataset(mixture / "mix.json", tok, seq_len=32, domains=["code", "math"])
    it = ds.train_batches(4)
    for _ in range(30):
        b = next(it)
    seen = it.tokens_seen()
    assert sum(seen.values()) == 30 * 4 * 33
    assert abs(seen["code"] / sum(seen.values()) - 0.75) < 0.01  # token shares follow the weights
    assert ({int(x) for x in np.unique(b.domain_ids)} - {-1}) == {0, 1}  # documents of both, with their domains
    state = json.loads(json.dumps(it.state_dict()))
    want = [next(it) for _ in range(40)]  # past each component's first epoch (80 documents each)
    assert it.epochs[0] >= 1  # (code, drawn 3x as often)
    again = ds.train_batches(4)
    again.load_state_dict(state)
    for a, b in zip(want, (next(again) for _ in range(40))):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    halves = [ds.train_batches(4, part=(r, 2)) for r in range(2)]
    whole = ds.train_batches(4)
    for _ in range(5):
        w, h0, h1 = next(whole), next(halves[0]), next(halves[1])
        assert all(np.array_equal(x, np.concatenate([y, z])) for x, y, z in zip(w, h0, h1))
    assert len(ds.valid) == len(ds.parts[0].valid) + len(ds.parts[1].valid)
    first = ds.valid_batches(2).batch_at(0)
    assert {int(x) for x in np.unique(first.domain_ids)} - {-1} == {0, 1}  # validation interleaves the components
    with pytest.raises(DataError, match="differs from the mixture"):
        ds.train_batches(8).load_state_dict(state)


def test_train_on_a_mixture_reports_the_tokens_of_each_component(small_run_inputs, mixture, tmp_path):  # noqa: F811
    from dh_mlx.train.report import _step_info
    from dh_mlx.train.run import train
    d = small_run_inputs
    common = dict(config=d / "config.json", data=mixture / "mix.json", tokenizer=d / "tok", steps=6, batch_size=2,
                  seq_len=16, eval_every=3, progress=False, warmup_steps=1)
    train(out=tmp_path / "full", **common)
    train(out=tmp_path / "part", stop_after=4, **common)
    train(out=tmp_path / "part", resume=True, **common)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    rows = metrics(tmp_path / "full")
    assert [sum(r["mixture_tokens"].values()) for r in rows] == [2 * 17 * s for s in range(1, 7)]
    assert rows[-1]["mixture_tokens"] == metrics(tmp_path / "part")[-1]["mixture_tokens"]
    code, math = rows[-1]["mixture_tokens"]["code"], rows[-1]["mixture_tokens"]["math"]
    assert _step_info(rows[-1]).endswith(f"| code {code} math {math}") and code > math  # (few documents yet)
    assert mx.isfinite(mx.array(rows[-1]["val_loss"])).item()


@pytest.mark.parametrize("spec,problem", [
    ("[]", "a mixture is a JSON object"),
    ('{"code": {"path": "code"}}', '"code" must be {"path": DIR, "weight": W}'),
    ('{"code": {"path": "code", "weight": -1}}', '"code".weight must be a number > 0, got -1'),
    ('{"code": {"path": "nowhere", "weight": 1}}', "nowhere: no such file or directory"),
])
def test_a_bad_mixture_file_is_one_line_naming_the_field(small_run_inputs, mixture, spec, problem):  # noqa: F811
    path = mixture / "bad.json"
    path.write_text(spec)
    with pytest.raises(DataError, match=problem.replace("(", r"\(").replace("{", r"\{")):
        open_dataset(path, _tok(small_run_inputs), seq_len=16)
