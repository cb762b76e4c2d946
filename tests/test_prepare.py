"""Prepared token shards (`dh-mlx data prepare`) and training from them: the in-memory pipeline's rows, order and
summary; byte-identical output whatever the workers; an interrupted prepare continued; bad lines reported as
`train` reports them; the cache for raw JSONL; bounded memory on a corpus larger than the bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dh_mlx.train.data import DataError, DataSummary, describe_dataset, load_dataset, read_jsonl
from dh_mlx.train.prepare import prepare, prepared_cache
from dh_mlx.train.prepared import open_dataset
from dh_mlx.train.shards import MANIFEST, WORK, PreparedData

DOMAINS = ["general", "code", "math", "legal"]


def records(n: int, seed: int = 0) -> list[dict]:
    """Every record kind train reads, with and without domains, non-ASCII text, documents longer than a row."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "x = 1", "é", "naïve", "\n", "def f():", "return 2"]
    out = []
    for i in range(n):
        text = f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(2, 60))))
        kind = i % 4
        if kind == 0:
            out.append({"domain": DOMAINS[i % 3], "text": text})
        elif kind == 1:
            out.append({"prompt": f"Q{i}: {text[:20]}", "completion": text[20:] or "x"})
        elif kind == 2:
            out.append({"domain": "math", "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": f"{i}?"},
                                                       {"role": "assistant", "content": text},
                                                       {"role": "user", "content": "more"},
                                                       {"role": "assistant", "content": str(i)}]})
        else:
            out.append({"text": text})
    return out


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    from dh_mlx.config import DATA_DIR
    from dh_mlx.tokenizer import load_tokenizer
    return load_tokenizer(DATA_DIR / "tokenizer")


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def assert_same_rows(packed, rows) -> None:
    got = rows.rows(np.arange(len(rows)))
    assert len(rows) == len(packed)
    for want, have, name in zip((packed.tokens, packed.train, packed.segments, packed.domains), got,
                                ("tokens", "trained", "segment ids", "domain ids")):
        assert np.array_equal(want, have), name


# ---- the same data as the in-memory pipeline -------------------------------------------------------------------
@pytest.mark.parametrize("seed,seq_len", [(0, 128), (3, 37)])
def test_prepared_rows_and_batches_equal_the_in_memory_pipeline_on_the_bundled_corpus(tmp_path, tok, seed, seq_len):
    from dh_mlx.config import DATA_DIR, load_preset
    corpus = DATA_DIR / "train_data.jsonl"
    domains = load_preset("tiny").domain_routing.names
    want = load_dataset(corpus, tok, seq_len=seq_len, domains=domains, seed=seed)
    prepare([corpus], tmp_path / "p", progress=False)
    got = open_dataset(tmp_path / "p", tok, seq_len=seq_len, domains=domains, seed=seed)
    assert_same_rows(want.train, got.train)
    assert_same_rows(want.valid, got.valid)
    assert len(want.train) > 5000 / (seq_len / 128) and len(want.valid) > 200 / (seq_len / 128)
    assert describe_dataset(corpus, got, seq_len, 0.05) == describe_dataset(corpus, want, seq_len, 0.05)
    a, b = want.train_batches(8, seed=seed), got.train_batches(8, seed=seed)
    a.load_state_dict({"epoch": 0, "index": a.batches_per_epoch - 3, "seed": seed})  # across an epoch boundary
    b.load_state_dict({"epoch": 0, "index": b.batches_per_epoch - 3, "seed": seed})
    for _ in range(8):
        for x, y in zip(next(a), next(b)):
            assert np.array_equal(x, y)
    assert b.epoch == 1
    for i in range(3):  # validation batches, in order, padded
        for x, y in zip(want.valid_batches(8).batch_at(i), got.valid_batches(8).batch_at(i)):
            assert np.array_equal(x, y)


def test_every_record_kind_and_masks_match_and_output_is_byte_identical_whatever_the_workers(tmp_path, tok):
    corpus = tmp_path / "in"
    corpus.mkdir()
    write(corpus / "a.jsonl", records(300, seed=1))
    write(corpus / "b.jsonl", records(200, seed=2))
    one = prepare([corpus], tmp_path / "one", workers=1, chunk_bytes=20_000, progress=False)
    two = prepare([str(corpus / "*.jsonl")], tmp_path / "two", workers=2, chunk_bytes=20_000, progress=False)
    assert one.shards == two.shards > 4 and two.workers == 2 and one.workers == 1
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")  # the manifest too
    want = load_dataset(corpus, tok, seq_len=24, domains=DOMAINS, seed=5, val_fraction=0.1)
    got = open_dataset(tmp_path / "two", tok, seq_len=24, domains=DOMAINS, seed=5, val_fraction=0.1)
    assert_same_rows(want.train, got.train)
    assert_same_rows(want.valid, got.valid)
    b = got.train.batch(np.arange(len(got.train)))
    assert 0 < b.loss_mask.mean() < 0.9  # prompts and user turns are not trained
    assert str(got.summary) == str(want.summary) and got.summary.records == 500
    # uint16 ids for an 8192-piece vocabulary; the manifest records the format version
    m = json.loads((tmp_path / "one" / MANIFEST).read_text())
    assert (m["version"], m["token_dtype"], m["documents"]) == (1, "<u2", 500)
    assert (tmp_path / "one" / "shard-00000.tokens").stat().st_size == 2 * m["shards"][0]["tokens"]


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_bad_lines_are_reported_as_train_reports_them(tmp_path):
    good = [json.dumps(r) for r in records(120)]
    bad = {37: "not json", 80: '{"text": 1}', 95: '{"domain": "cooking", "text": "x"}', 110: '{"nothing": 1}'}
    lines = [bad.get(i, line) for i, line in enumerate(good)]
    d = tmp_path / "in"
    d.mkdir()
    write(d / "a.jsonl", lines[:60] + [""])
    write(d / "b.jsonl", lines[60:])
    (d / "c.jsonl").write_text("\n \n")  # an empty file (blank lines only)
    with pytest.raises(DataError) as want:
        list(read_jsonl(d))
    with pytest.raises(DataError) as got:
        prepare([d], tmp_path / "p", chunk_bytes=2000, workers=2, progress=False)
    assert str(got.value) == str(want.value) == f"{d / 'a.jsonl'}:38: invalid JSON: Expecting value (column 1)"
    assert not (tmp_path / "p" / MANIFEST).exists()
    summary = DataSummary()
    list(read_jsonl(d, skip_invalid=True, summary=summary))
    r = prepare([d], tmp_path / "p", chunk_bytes=2000, workers=2, skip_invalid=True, progress=False)
    r.summary.tokens = 0  # (read_jsonl does not tokenize)
    assert r.summary == summary and "skipped 4" in str(r.summary)  # counts by reason, the first lines, blanks
    assert summary.examples[:2] == [f"{d / 'a.jsonl'}:38: invalid JSON: Expecting value (column 1)",
                                    f"{d / 'b.jsonl'}:21: \"text\" must be a string, got int"]
    assert summary.examples[-1] == f"{d / 'c.jsonl'}:1: empty file (no JSONL records)"


def test_unknown_domains_and_another_tokenizer_are_refused_at_train_time(tmp_path, tok):
    rows = records(40) + [{"domain": "cooking", "text": "soup"}] * 3
    corpus = write(tmp_path / "c.jsonl", rows)
    prepare([corpus], tmp_path / "p", progress=False)
    with pytest.raises(DataError) as want:
        load_dataset(corpus, tok, seq_len=16, domains=DOMAINS)
    with pytest.raises(DataError) as got:
        open_dataset(tmp_path / "p", tok, seq_len=16, domains=DOMAINS)
    assert str(got.value) == str(want.value) and str(got.value).startswith(f"{corpus}:41: unknown domain 'cooking'")
    want = load_dataset(corpus, tok, seq_len=16, domains=DOMAINS, skip_invalid=True)
    got = open_dataset(tmp_path / "p", tok, seq_len=16, domains=DOMAINS, skip_invalid=True)
    assert_same_rows(want.train, got.train)
    assert got.summary.skipped == {"unknown domain": 3} and got.summary.records == 40
    as_code = open_dataset(tmp_path / "p", tok, seq_len=16, domains=DOMAINS, as_domain="code")  # domains add
    assert set(np.unique(as_code.train.rows(np.arange(4))[3])) <= {-1, 1}
    from dh_mlx.train.tokenizer import train_tokenizer
    other = train_tokenizer(corpus, tmp_path / "tok", vocab_size=400)
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        open_dataset(tmp_path / "p", other, seq_len=16)


# ---- interruption ------------------------------------------------------------------------------------------------
PREPARE = "import sys; from dh_mlx.cli import main; sys.argv = ['dh-mlx', 'data', 'prepare'] + sys.argv[1:]; main()"


@pytest.mark.slow  # a subprocess
def test_an_interrupted_prepare_never_looks_complete_and_continues_to_identical_shards(tmp_path, tok):
    corpus = write(tmp_path / "c.jsonl", records(30000))
    args = ["--data", str(corpus), "--out", str(tmp_path / "p"), "--workers", "2", "--shard-mb", "0.04"]
    for sig in (signal.SIGINT, signal.SIGKILL):  # Ctrl-C (the workers stopped), then every process killed
        proc = subprocess.Popen([sys.executable, "-c", PREPARE, *args], stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        while len(list((tmp_path / "p" / WORK).glob("chunk-*.json"))) < 5 * (1 + (sig == signal.SIGKILL)):
            time.sleep(0.005)
            assert proc.poll() is None, proc.stderr.read()
        os.kill(proc.pid, sig) if sig == signal.SIGINT else os.killpg(proc.pid, sig)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
        if sig == signal.SIGINT:
            assert "chunks are done in" in err and "run the same command again to continue" in err
        assert not (tmp_path / "p" / MANIFEST).exists()
        with pytest.raises(DataError, match="unfinished `dh-mlx data prepare`"):
            open_dataset(tmp_path / "p", tok, seq_len=16)
    done = subprocess.run([sys.executable, "-c", PREPARE, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "prepare: " in done.stderr and " MB/s | " in done.stderr and " M tokens/s | 2 worker(s)" in done.stderr
    assert "30000 records (- 15000, code 2500, general 2500, math 10000)" in done.stderr  # train's summary
    reused = int(done.stderr.split(" chunk(s) from the interrupted run")[0].split()[-1])
    r = prepare([corpus], tmp_path / "fresh", workers=1, chunk_bytes=40_000, progress=False)
    assert 10 <= reused < r.shards
    assert files_of(tmp_path / "p") == files_of(tmp_path / "fresh")


def test_an_interrupted_prepare_of_a_changed_input_starts_afresh(tmp_path, monkeypatch):
    import dh_mlx.train.prepare as prep
    corpus = write(tmp_path / "c.jsonl", records(2000))
    real, calls = prep.prepare_chunk, []

    def interrupted(task):
        calls.append(task["index"])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prep, "prepare_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus], tmp_path / "p", workers=1, chunk_bytes=20_000, progress=False)
    monkeypatch.setattr(prep, "prepare_chunk", real)
    assert len(list((tmp_path / "p" / WORK).glob("chunk-*.json"))) == 3
    assert prepare([corpus], tmp_path / "p", workers=1, chunk_bytes=20_000, progress=False).reused == 3
    monkeypatch.setattr(prep, "prepare_chunk", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus], tmp_path / "p", force=True, workers=1, chunk_bytes=20_000, progress=False)
    monkeypatch.setattr(prep, "prepare_chunk", real)
    write(corpus, records(1500, seed=9))  # the input changes before the run is continued
    assert prepare([corpus], tmp_path / "p", workers=1, chunk_bytes=20_000, progress=False).reused == 0
    prepare([corpus], tmp_path / "fresh", workers=1, chunk_bytes=20_000, progress=False)
    assert files_of(tmp_path / "p") == files_of(tmp_path / "fresh")


def test_the_output_rules(tmp_path):
    corpus = write(tmp_path / "c.jsonl", records(20))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    from dh_mlx.outputs import OutputError
    with pytest.raises(OutputError, match="already holds notes.txt"):
        prepare([corpus], tmp_path / "taken", progress=False)
    with pytest.raises(OutputError, match="is, or holds, the input"):
        prepare([corpus], tmp_path, progress=False)
    prepare([corpus], tmp_path / "p", progress=False)
    with pytest.raises(OutputError, match="pass `force=True`"):
        prepare([corpus], tmp_path / "p", progress=False)
    prepare([corpus], tmp_path / "p", force=True, progress=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


# ---- the cache for raw JSONL ------------------------------------------------------------------------------------
def test_jsonl_is_prepared_once_into_a_cache_keyed_by_contents_and_tokenizer(tmp_path, tok, capsys, monkeypatch):
    corpus = write(tmp_path / "c.jsonl", records(50))
    monkeypatch.setattr("dh_mlx.train.prepare.SMALL", 0)  # (small inputs are prepared silently)
    from dh_mlx.progress import show_progress
    show_progress()  # the status lines go where the CLI sends them: stderr
    a = prepared_cache(corpus, tok)
    assert "data: preparing 1 file(s)" in capsys.readouterr().err
    stamp = (a / MANIFEST).stat().st_mtime_ns
    assert prepared_cache(corpus, tok) == a and (a / MANIFEST).stat().st_mtime_ns == stamp
    assert "preparing" not in capsys.readouterr().err
    assert prepared_cache(corpus, tok, skip_invalid=True) != a
    write(corpus, records(51))
    assert prepared_cache(corpus, tok) != a
    from dh_mlx.train.tokenizer import train_tokenizer
    other = train_tokenizer(corpus, tmp_path / "tok", vocab_size=400)
    assert prepared_cache(corpus, other) not in (a, prepared_cache(corpus, tok))


# ---- bounded memory ----------------------------------------------------------------------------------------------
MEASURE = r"""
import os, sys, threading, time
from dh_mlx.train.prepare import current_rss, prepare
def tree_rss():
    pids, total = [os.getpid()], 0
    while pids:
        pid = pids.pop()
        try:
            total += int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) * 1024
            for t in os.listdir(f"/proc/{pid}/task"):
                pids += [int(c) for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except (OSError, IndexError):
            pass
    return total
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], tree_rss())
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
r = prepare([sys.argv[1]], sys.argv[2], workers=2, max_memory=float(sys.argv[3]) - current_rss(), progress=False)
print(peak[0], r.peak_bytes, r.tokens_in, r.workers)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prepare_holds_memory_under_a_bound_on_a_corpus_several_times_larger(tmp_path, tok):
    bound = 180e6
    rng = np.random.default_rng(0)
    with open(tmp_path / "big.jsonl", "w") as f:  # digits: one token a byte, the most tokens per byte of JSONL
        while f.tell() < 3 * bound:
            digits = rng.integers(48, 58, size=(1000, 4000), dtype=np.uint8)
            f.write("".join(json.dumps({"domain": "math", "text": f"row {i}: " + d.tobytes().decode()}) + "\n"
                            for i, d in enumerate(digits)))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big.jsonl"), str(tmp_path / "p"),
                          str(bound)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "DH_MLX_BLAS": "off"})
    assert out.returncode == 0, out.stderr[-3000:]
    sampled, reported, tokens, workers = map(float, out.stdout.split())
    print(f"peak {sampled / 1e6:.0f} MB sampled, {reported / 1e6:.0f} MB reported; {tokens / 1e6:.0f} M tokens")
    assert workers == 2 and tokens > 2.5 * bound  # (the in-memory pipeline holds about 37 bytes a token)
    assert sampled < bound and reported < bound, (sampled / 1e6, reported / 1e6)
    assert (tmp_path / "big.jsonl").stat().st_size > 3 * bound
    assert PreparedData(tmp_path / "p").manifest["tokens"] == tokens


def test_preparing_and_reading_shards_needs_no_mlx(tmp_path):
    """The twin's trainer reads data on machines without MLX: preparing (into the cache) and batching never
    import it."""
    corpus = write(tmp_path / "c.jsonl", records(40))
    code = ("import sys; from dh_mlx.config import DATA_DIR; from dh_mlx.tokenizer import load_tokenizer; "
            "from dh_mlx.train.prepared import open_dataset; "
            f"ds = open_dataset({str(corpus)!r}, load_tokenizer(DATA_DIR / 'tokenizer'), seq_len=16); "
            "next(ds.train_batches(2)); print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "[]"
