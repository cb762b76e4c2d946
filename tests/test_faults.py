"""Faults during training: a signal saves a checkpoint and exits 128 + signal with the resume command; one
training per run directory; a full disk is named as such and leaves no partial checkpoint; a damaged
checkpoint or a truncated metrics line falls back to what is intact."""

import errno
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from dh_mlx.checkpoint.training import CheckpointWriteError, latest_checkpoint
from helpers import make_config, write_corpus


pytestmark = pytest.mark.slow  # (not in the quick tier, pytest -m "not slow")

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dh_mlx.config import save_config
    from dh_mlx.train.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("faults")
    write_corpus(d / "data.jsonl")
    train_tokenizer(d / "data.jsonl", d / "tok", vocab_size=300)
    save_config(make_config(vocab_size=300), d)
    return d


def args(d, out, steps=200, *extra):
    return ["train", "--config", str(d / "config.json"), "--data", str(d / "data.jsonl"), "--tokenizer",
            str(d / "tok"), "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "1000", "--save-every", "1000", *extra]


def start(d, out, ignore_sigint=False):
    """A run long enough that a signal always finds it running."""
    return subprocess.Popen([sys.executable, "-m", "dh_mlx.cli", *args(d, out, 10**6)], stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint
                            else None)


def wait_for_step(proc, timeout=240) -> list[str]:
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        seen.append(line)
        if line.startswith("step 10/"):
            return seen
        assert line or proc.poll() is None, "".join(seen)
    raise AssertionError("".join(seen))


@pytest.mark.parametrize("signum, ignore_sigint", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_signal_saves_a_checkpoint_and_exits_with_the_resume_command(inputs, tmp_path, signum, ignore_sigint):
    out = tmp_path / "run"
    proc = start(inputs, out, ignore_sigint=ignore_sigint)  # SIGINT ignored: as a script's background job
    wait_for_step(proc)
    proc.send_signal(signum)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signum, err
    assert "Traceback" not in err
    step = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["step"]
    assert step >= 10
    # the checkpoint is exactly step `step`: the same weights as a run stopped there on purpose
    from dh_mlx.train.run import train
    import mlx.core as mx
    train(config=inputs / "config.json", data=inputs / "data.jsonl", tokenizer=inputs / "tok", out=tmp_path / "ref",
          steps=10**6, batch_size=2, seq_len=16, eval_every=1000, save_every=1000, progress=False, stop_after=step)
    got, want = (mx.load(str(latest_checkpoint(d) / "weights.safetensors")) for d in (out, tmp_path / "ref"))
    assert set(got) == set(want) and all(mx.array_equal(got[k], want[k]).item() for k in got)
    (resume,) = [l for l in err.splitlines() if l.startswith("continue with: ")]
    command = shlex.split(resume.removeprefix("continue with: "))
    assert command[0] == "dh-mlx" and command[-1] == "--resume"
    command[command.index("--steps") + 1] = str(step + 2)  # the command as printed, with a nearer end
    r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", *command[1:]], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"finished step {step + 2}" in r.stderr
    assert f"note: resuming step_{step:06d} with other training options: steps 1000000 -> {step + 2}" in r.stderr


def test_one_training_per_run_directory_and_a_dead_one_leaves_no_lock(inputs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", *args(inputs, out, 2, "--force")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "another training (pid 4242) is writing this run" in r.stderr, r.stderr
    os.close(fd)  # the holder is gone
    proc = start(inputs, tmp_path / "killed")
    wait_for_step(proc)
    proc.kill()  # kill -9: no handler runs, the kernel drops the lock
    proc.wait(timeout=60)
    (tmp_path / "killed" / "checkpoints").mkdir(exist_ok=True)
    (tmp_path / "killed" / "checkpoints" / ".tmp-step_000012").mkdir()  # a write it did not finish
    r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", *args(inputs, tmp_path / "killed", 2, "--force")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))


def _train(inputs, out, **kw):
    from dh_mlx.train.run import train
    common = dict(config=inputs / "config.json", data=inputs / "data.jsonl", tokenizer=inputs / "tok",
                  batch_size=2, seq_len=16, eval_every=1000, progress=False, warmup_steps=1)
    return train(out=out, **{**common, **kw})


def losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_falls_back_to_the_newest_intact_checkpoint(inputs, tmp_path, capsys):
    _train(inputs, tmp_path / "straight", steps=6, save_every=2)
    _train(inputs, tmp_path / "run", steps=6, save_every=2, keep_checkpoints=2, stop_after=4)
    newest = latest_checkpoint(tmp_path / "run")
    assert newest.name == "step_000004"
    blob = newest / "optimizer.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    blob.write_bytes(bytes(data))
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # the line a killed run was writing
    r = _train(inputs, tmp_path / "run", steps=6, save_every=2, keep_checkpoints=2, resume=True)
    err = capsys.readouterr().err
    assert "checkpoint step_000004 is damaged" in err and "checksum does not match" in err
    assert r.step == 6
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")  # resumed from step 2, exactly


def test_a_full_disk_is_named_and_leaves_no_partial_checkpoint(inputs, tmp_path, monkeypatch):
    import shutil

    import dh_mlx.checkpoint.training as ckpt
    real = ckpt.mx.save_safetensors

    def full(path, arrays, *a, **k):
        if path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, arrays, *a, **k)

    monkeypatch.setattr(ckpt.mx, "save_safetensors", full)
    with pytest.raises(CheckpointWriteError, match=r"\.tmp-step_000002: writing checkpoint step 2 failed \(disk full"):
        _train(inputs, tmp_path / "run", steps=2, save_every=2)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(ckpt.mx, "save_safetensors", real)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage._replace(free=20_000))
    with pytest.raises(CheckpointWriteError, match=r"checkpoints: not enough free disk space for a checkpoint: it "
                                                   r"needs about [\d.]+ MB, 20.0 KB is free"):
        _train(inputs, tmp_path / "run2", steps=2, save_every=2)
    assert not (tmp_path / "run2" / "checkpoints").exists() or not any((tmp_path / "run2" / "checkpoints").iterdir())


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_losses(inputs, tmp_path):
    import random
    opts = ["--save-every", "1", "--eval-every", "50"]
    straight = subprocess.run([sys.executable, "-m", "dh_mlx.cli", *args(inputs, tmp_path / "straight", 150, *opts)],
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    for _ in range(4):
        started = (out / "checkpoints").is_dir() and latest_checkpoint(out) is not None
        again = ["--resume"] if started else ["--force"]
        proc = subprocess.Popen([sys.executable, "-m", "dh_mlx.cli", *args(inputs, out, 150, *opts, *again)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:  # training has started (or the run ended)
            if line.startswith("step ") or line.startswith("finished"):
                break
        time.sleep(rng.uniform(0.0, 2.0))  # ~50 ms a step, each checkpointed: mid-step or mid-write
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2  # the test's premise: runs were cut short, at different moments
    done = subprocess.run([sys.executable, "-m", "dh_mlx.cli", *args(inputs, out, 150, *opts, "--resume")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert losses(out) == losses(tmp_path / "straight") and len(losses(out)) == 150
