"""No write or delete outside what a command owns: links planted where a command writes are replaced or refused,
never written through; --force removes only files of the kinds the command writes; checkpoint rotation removes
only checkpoints its run wrote; "the output is the input" is decided by identity (device and inode)."""

import os
import subprocess

import pytest

from dh_mlx.files import FileKindError, inside, same_file, write_atomic
from dh_mlx.outputs import OutputError, check_output_dir, check_output_file
from helpers import cli, model_with_tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("links")
    model_with_tokenizer(root, "model")
    return root


@pytest.fixture
def outside(tmp_path):
    """A folder of files no command was asked to touch, and a way to check they were not."""
    d = tmp_path / "outside"
    d.mkdir()
    for name in ("victim.txt", "other.txt"):
        (d / name).write_text(f"{name} must stay")

    def untouched() -> bool:
        return sorted(p.name for p in d.iterdir()) == ["other.txt", "victim.txt"] and all(
            (d / n).read_text() == f"{n} must stay" for n in ("victim.txt", "other.txt"))
    return d, untouched


def test_an_atomic_write_replaces_a_link_and_leaves_its_target(outside, tmp_path):
    d, untouched = outside
    (tmp_path / "config.json").symlink_to(d / "victim.txt")
    (tmp_path / ".tmp-config.json").symlink_to(d / "other.txt")  # even the temporary name
    write_atomic(tmp_path / "config.json", "{}")
    assert not (tmp_path / "config.json").is_symlink() and (tmp_path / "config.json").read_text() == "{}"
    assert untouched()


def train_args(inputs, out, steps):
    return ["train", "--config", str(inputs / "model" / "config.json"), "--data", str(inputs / "data.jsonl"),
            "--tokenizer", str(inputs / "tok"), "--batch-size", "2", "--seq-len", "16", "--eval-every", "100",
            "--save-every", "1", "--steps", str(steps), "--out", str(out)]


@pytest.mark.slow
def test_resume_writes_through_no_link(inputs, outside, tmp_path):
    d, untouched = outside
    run = tmp_path / "run"
    assert cli(*train_args(inputs, run, 1)).returncode == 0
    for name in ("metrics.jsonl", "train_config.json", "tokenizer.model", "tokenizer_config.json"):
        (run / name).unlink()
        (run / name).symlink_to(d / "victim.txt")
    r = cli(*train_args(inputs, run, 3), "--resume")
    assert r.returncode == 0, r.stderr
    assert untouched() and not (run / "metrics.jsonl").is_symlink()
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(d / "victim.txt")
    r = cli(*train_args(inputs, run, 4), "--resume")
    assert r.returncode == 1 and "is a symbolic link" in r.stderr and ".lock" in r.stderr, r.stderr
    assert untouched()


@pytest.mark.slow
def test_rotation_removes_only_checkpoints_of_its_run(inputs, outside, tmp_path):
    d, untouched = outside
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000000").mkdir(parents=True)  # a user's folder, not one of ours
    (run / "checkpoints" / "step_000000" / "notes.txt").write_text("mine")
    r = cli(*train_args(inputs, run, 3), "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000000", "step_000003"]
    assert (run / "checkpoints" / "step_000000" / "notes.txt").read_text() == "mine"
    # checkpoints/ as a link to a folder elsewhere holding step_* folders: never written into, never emptied
    (d / "step_000001").mkdir()
    (d / "step_000001" / "planted.txt").write_text("planted")
    linked = tmp_path / "linked"
    assert cli(*train_args(inputs, linked, 1)).returncode == 0
    os.rename(linked / "checkpoints", tmp_path / "moved")
    (linked / "checkpoints").symlink_to(d)
    r = cli(*train_args(inputs, linked, 2), "--force")
    assert r.returncode == 1 and "is a symbolic link" in r.stderr, r.stderr
    assert (d / "step_000001" / "planted.txt").read_text() == "planted"


def test_force_replaces_only_what_the_command_writes(inputs, outside, tmp_path):
    d, untouched = outside
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_backup.safetensors").write_text("a user's file")
    (out / "model-00001-of-00002.safetensors").write_text("an earlier write of ours")
    for name in ("tokenizer.json", "tokenizer.model", "generation_config.json", "special_tokens_map.json"):
        (out / name).symlink_to(d / "victim.txt")  # as in a Hugging Face cache snapshot
    r = cli("convert", "hf", "--model", str(inputs / "model"), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert untouched()
    assert (out / "model_backup.safetensors").read_text() == "a user's file"
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert "replacing model-00001-of-00002.safetensors" in r.stderr
    assert not (out / "generation_config.json").is_symlink() and (out / "config.json").is_file()


def test_identity_not_spelling(inputs, tmp_path):
    model = inputs / "model"
    (tmp_path / "alias").symlink_to(model)
    with pytest.raises(OutputError, match="is, or holds, the input"):
        check_output_dir(tmp_path / "alias", inputs=[model], force=True)
    with pytest.raises(OutputError, match="lies inside the input"):
        check_output_dir(tmp_path / "alias" / "sub", inputs=[model], force=True)
    os.link(model / "model.safetensors", tmp_path / "hard.gguf")
    with pytest.raises(OutputError, match="is the input"):
        check_output_file(tmp_path / "hard.gguf", inputs=[model / "model.safetensors"], force=True)
    assert same_file(tmp_path / "hard.gguf", model / "model.safetensors")


def test_a_bind_mount_of_the_input_is_the_input(inputs, tmp_path):
    mount = tmp_path / "mounted"
    mount.mkdir()
    if subprocess.run(["mount", "--bind", str(inputs / "model"), str(mount)], capture_output=True).returncode:
        pytest.skip("bind mounts need root (CAP_SYS_ADMIN)")
    try:
        assert inside(mount, inputs / "model") and not (mount.resolve() == (inputs / "model").resolve())
        before = (inputs / "model" / "model.safetensors").read_bytes()
        for args in (["quantize", "--model", str(inputs / "model"), "--out", str(mount), "--force"],
                     ["convert", "hf", "--model", str(mount), "--out", str(inputs / "model"), "--force"]):
            r = cli(*args)
            assert r.returncode == 1 and "is, or holds, the input" in r.stderr, (args, r.stderr)
        assert (inputs / "model" / "model.safetensors").read_bytes() == before
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_write_below_a_linked_directory_is_refused(tmp_path, outside):
    from dh_mlx.files import real_dir
    d, untouched = outside
    (tmp_path / "checkpoints").symlink_to(d)
    with pytest.raises(FileKindError, match="symbolic link"):
        real_dir(tmp_path / "checkpoints")
    assert untouched()


def test_plot_replaces_a_linked_png_and_leaves_its_target(outside, tmp_path):
    pytest.importorskip("matplotlib")
    from dh_mlx.train.plot import plot_run
    d, untouched = outside
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        f'{{"step": {i}, "ce": {5 - i / 10}, "mtp": 5.0, "loss": 5.0, "val_loss": 4.0}}\n' for i in range(1, 4)))
    (run / "loss.png").symlink_to(d / "victim.txt")
    assert plot_run(run) == [run / "loss.png"]
    assert untouched() and not (run / "loss.png").is_symlink()
