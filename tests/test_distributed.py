"""Data-parallel training over mx.distributed, two ranks on loopback (`mlx.launch --backend ring`): the losses
of a single process trained on the same global batch, identical parameters on both ranks, one run directory
(rank 0's), resume, LoRA, and the step's communication reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import LAUNCH, free_port, model_with_tokenizer

pytestmark = [pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this python"),
              pytest.mark.slow]  # (several processes: not in the quick tier)

DUMP = r"""
import sys, numpy as np
from mlx.utils import tree_flatten
import dh_mlx.train.trainer as trainer
from dh_mlx.train.distributed import world
real, dump = trainer._train, sys.argv[1]
def dumping(model, *args, **kwargs):  # every rank's parameters once its loop ends
    result = real(model, *args, **kwargs)
    np.savez(dump + f"/rank{world().rank}.npz", **{k: np.array(v) for k, v in tree_flatten(model.parameters())})
    return result
trainer._train = dumping
sys.argv = ["dh-mlx"] + sys.argv[2:]
from dh_mlx.cli import main
main()
"""


def run(args: list[str], dump: Path, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`dh-mlx ARGS` in one process, or under `mlx.launch` on `ranks` loopback ranks; parameters into `dump`."""
    dump.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", DUMP, str(dump), *args]
    if ranks > 1:
        cmd = [str(LAUNCH), "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1",
               "--starting-port", str(free_port()), "--", *cmd]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def params(dump: Path, rank: int = 0) -> dict[str, np.ndarray]:
    return dict(np.load(dump / f"rank{rank}.npz"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    return model_with_tokenizer(root), root / "data.jsonl"


def train_args(model: Path, data: Path, out: Path, batch: int, steps: int = 4, *extra: str) -> list[str]:
    return ["train", "--init", str(model), "--tokenizer", str(model), "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--batch-size", str(batch), "--seq-len", "32", "--eval-every", "2",
            "--warmup", "1", "--lr", "3e-3", *extra]


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=2e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose([r["val_loss"] for r in a if "val_loss" in r],
                               [r["val_loss"] for r in b if "val_loss" in r], rtol=2e-4)


def test_two_ranks_train_as_one_process_on_their_global_batch(base, tmp_path):
    model, data = base
    run(train_args(model, data, tmp_path / "one", batch=4), tmp_path / "d1")
    r = run(train_args(model, data, tmp_path / "two", batch=2), tmp_path / "d2", ranks=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == 4 and one[0]["loss"] != one[-1]["loss"]
    assert_same_run(two, one)
    p0, p1, single = params(tmp_path / "d2", 0), params(tmp_path / "d2", 1), params(tmp_path / "d1")
    assert p0.keys() == p1.keys() == single.keys()
    assert all(np.array_equal(p0[k], p1[k]) for k in p0)  # ALF biases included: every rank routes alike
    assert max(np.abs(p0[k] - single[k]).max() for k in p0) < 1e-4
    moved = [k for k in p0 if k.endswith("e_score_correction_bias") and np.abs(p0[k]).max() > 0]
    assert moved  # ALF ran, on the summed loads
    # the gradients go through a few bucketed all_sums, reported per step
    grad_bytes = sum(v.nbytes for k, v in p0.items() if not k.endswith("e_score_correction_bias"))
    assert all(grad_bytes <= s["comm_bytes"] <= grad_bytes * 1.01 + 4096 for s in two)
    assert all(1 <= s["comm_calls"] <= 4 for s in two) and all(s["comm_s"] > 0 for s in two)
    assert "2 ranks:" in r.stderr and "all-summed per step" in r.stderr
    # one run directory, written by rank 0 alone; its model is the trained one
    from dh_mlx import load_model
    from mlx.utils import tree_flatten
    loaded = dict(tree_flatten(load_model(tmp_path / "two").parameters()))
    assert all(np.array_equal(np.array(loaded[k]), p0[k]) for k in p0)


def test_resume_continues_every_rank(base, tmp_path):
    model, data = base
    for out, batch, ranks in (("one", 4, 1), ("two", 2, 2)):  # 3 steps, then 3 more from the checkpoint
        run(train_args(model, data, tmp_path / out, batch, 3), tmp_path / f"d{ranks}", ranks=ranks)
        run(train_args(model, data, tmp_path / out, batch, 6, "--resume"), tmp_path / f"d{ranks}", ranks=ranks)
    assert_same_run(metrics(tmp_path / "two"), metrics(tmp_path / "one"))
    p0, p1 = params(tmp_path / "d2", 0), params(tmp_path / "d2", 1)
    assert all(np.array_equal(p0[k], p1[k]) for k in p0)


def test_lora_on_two_ranks(base, tmp_path):
    model, data = base
    args = ["lora", "--model", str(model), "--data", str(data), "--rank", "4", "--steps", "4", "--seq-len", "32",
            "--eval-every", "2", "--lr", "1e-2"]
    run([*args, "--batch-size", "4", "--out", str(tmp_path / "one")], tmp_path / "d1")
    r = run([*args, "--batch-size", "2", "--out", str(tmp_path / "two")], tmp_path / "d2", ranks=2)
    assert_same_run(metrics(tmp_path / "two"), metrics(tmp_path / "one"))
    p0, p1 = params(tmp_path / "d2", 0), params(tmp_path / "d2", 1)
    assert all(np.array_equal(p0[k], p1[k]) for k in p0)
    assert (tmp_path / "two" / "adapters.safetensors").is_file() and "validation loss" in r.stderr


def test_a_rank_0_refusal_stops_every_rank(base, tmp_path):
    model, data = base
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("someone's file")
    cmd = [str(LAUNCH), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--starting-port", str(free_port()),
           "--", sys.executable, "-m", "dh_mlx.cli", *train_args(model, data, tmp_path / "taken", 2)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # (mlx.launch itself exits 0)
    assert "exited with code 1" in r.stderr and "already holds notes.txt" in r.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "someone's file"


def test_resuming_on_another_number_of_ranks_is_refused(base, tmp_path):
    model, data = base
    run(train_args(model, data, tmp_path / "one", 4, 2), tmp_path / "d1")
    cmd = [str(LAUNCH), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--starting-port", str(free_port()),
           "--", sys.executable, "-m", "dh_mlx.cli", *train_args(model, data, tmp_path / "one", 2, 4, "--resume")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "saved by a run on 1 rank(s); resume it on as many (this run has 2)" in r.stderr, r.stderr[-2000:]
