"""A fuzz test over every command that writes: random layouts of symbolic links (to files and folders elsewhere),
hard links, FIFOs and users' own files where a command writes, and links or FIFOs among its inputs. Whatever the
layout, the command ends (no hang), with success or a one-line error, and nothing outside its output changes:
not the files links point to, not a hard link's other name, not the input."""

import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_checkpoint, model_with_tokenizer

pytestmark = pytest.mark.slow

# Every name some writing command writes into its output (or passes through on its way there).
WRITTEN = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
           "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
           "generation_config.json", "adapters.safetensors", "adapter_config.json", "metrics.jsonl",
           "train_config.json", ".lock", "checkpoints", ".tmp-config.json", ".tmp-shard-00001.safetensors"]
INPUT_FILES = ["config.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"]
KINDS = ["link to a file", "link to a folder", "hard link", "fifo", "user file", "absent", "absent"]


def snapshot(root: Path) -> dict:
    """Every entry under `root` (not following links): its kind, and a file's content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = "-> " + os.readlink(p)
            else:
                out[str(p.relative_to(root))] = stat.S_IFMT(st.st_mode)
    return out


def plant(path: Path, kind: str, outside: Path, rng: random.Random) -> None:
    if kind == "absent":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    target = outside / f"victim-{rng.randrange(3)}.txt"
    if kind == "link to a file":
        path.symlink_to(target)
    elif kind == "link to a folder":
        path.symlink_to(outside / "folder")
    elif kind == "hard link":
        os.link(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_text("a user's file")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = model_with_tokenizer(root, "model")
    for f in model.glob("*.safetensors"):  # the same model with domains, for the domains commands
        f.unlink()
    make_checkpoint(model, vocab_size=400, n_routed_experts=12, n_group=4, topk_group=2,
                    domain_routing={"domains": ["general", "code", "math"], "experts_per_domain": 3})
    adapter = root / "adapter"
    r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "lora", "--model", str(model), "--data",
                        str(root / "data.jsonl"), "--out", str(adapter), "--steps", "1", "--batch-size", "2",
                        "--seq-len", "16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return root, model, adapter


def commands(model: Path, inp: Path, data: Path, adapter: Path, out: Path) -> dict[str, list[str]]:
    train = ["--data", str(data), "--batch-size", "2", "--seq-len", "16", "--steps", "1"]
    return {
        "quantize": ["quantize", "--model", str(inp), "--bits", "8", "--out", str(out)],
        "convert hf": ["convert", "hf", "--model", str(inp), "--out", str(out)],
        "convert mlx": ["convert", "mlx", "--model", str(inp), "--bits", "8", "--out", str(out)],
        "convert gguf": ["convert", "gguf", "--model", str(inp), "--outtype", "f32", "--out", str(out / "m.gguf")],
        "convert import": ["convert", "import", "--input", str(model / "model.safetensors"), "--config",
                           str(inp / "config.json"), "--tokenizer", str(inp), "--out", str(out)],
        "train": ["train", "--config", str(inp / "config.json"), "--tokenizer", str(inp), *train, "--out", str(out)],
        "lora": ["lora", "--model", str(inp), *train, "--out", str(out)],
        "fuse": ["fuse", "--model", str(inp), "--adapter", str(adapter), "--out", str(out)],
        "tokenizer train": ["tokenizer", "train", "--data", str(data), "--vocab-size", "400", "--out", str(out)],
        "domains extract": ["domains", "extract", "--model", str(inp), "--name", "code", "--out", str(out)],
        "domains remove": ["domains", "remove", "--model", str(inp), "--name", "general", "--out", str(out)],
        "domains add": ["domains", "add", "--model", str(inp), "--name", "new", *train, "--out", str(out)],
    }


NAMES = ["quantize", "convert hf", "convert mlx", "convert gguf", "convert import", "train", "lora", "fuse",
         "tokenizer train", "domains extract", "domains remove", "domains add"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", NAMES)
def test_a_writing_command_changes_nothing_outside_its_output(world, tmp_path, name, seed):
    root, model, adapter = world
    rng = random.Random(f"{name}-{seed}")
    outside = tmp_path / "outside"
    (outside / "folder" / "step_000001").mkdir(parents=True)
    (outside / "folder" / "config.json").write_text("{}")
    for i in range(3):
        (outside / f"victim-{i}.txt").write_text(f"victim {i}")
    inp = tmp_path / "input"
    shutil.copytree(model, inp)
    originals = tmp_path / "originals"
    originals.mkdir()
    for f in rng.sample(INPUT_FILES, 2):  # inputs reached through links (fine), or FIFOs (refused at once)
        shutil.move(inp / f, originals / f)
        if rng.random() < 0.85:
            (inp / f).symlink_to(originals / f)
        else:
            os.mkfifo(inp / f)
    out = tmp_path / "out"
    out.mkdir()
    for f in WRITTEN + [".tmp-m.gguf", "m.gguf"]:
        plant(out / f, rng.choice(KINDS), outside, rng)
    if (out / "checkpoints").is_dir() and not (out / "checkpoints").is_symlink():
        plant(out / "checkpoints" / "step_000001", rng.choice(["link to a folder", "user file"]), outside, rng)
    before = {d: snapshot(d) for d in (outside, inp, originals, model)}
    args = commands(model, inp, root / "data.jsonl", adapter, out)[name]
    r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", *args, "--force"], capture_output=True, text=True,
                       timeout=240)  # a hang (a FIFO opened for reading) fails here
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    if r.returncode == 1:
        assert len([l for l in r.stderr.splitlines() if l.startswith("error: ")]) == 1, r.stderr
    for d, was in before.items():
        assert snapshot(d) == was, (name, d, r.stderr)
