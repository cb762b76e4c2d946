"""The README is a user's manual and BENCHMARKS.md holds one current, attributed figure per benchmark."""

import re
import shlex
import subprocess

import pytest

from dh_mlx.config import REPO_DIR

README = (REPO_DIR / "README.md").read_text()
BENCHMARKS = (REPO_DIR / "BENCHMARKS.md").read_text()


def _bash_commands(text: str) -> list[list[str]]:
    """The `dh-mlx ...` and `python convert/...` command lines of the fenced bash/console blocks."""
    lines = []
    for kind, block in re.findall(r"```(bash|console)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a command continued with a backslash is one line
            if kind == "console" and not line.startswith("$ "):
                continue  # a command's output
            line = line.removeprefix("$ ").split("  #")[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part.split(" # ")[0]) if part.strip() else []
                if words[:1] == ["dh-mlx"] or words[:2] == ["python", "convert/convert_to_gguf.py"]:
                    lines.append(words)
    return lines


def test_the_readme_is_short_and_starts_with_the_two_commands():
    assert len(README.splitlines()) < 300
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    assert "dh-mlx train" in first and "python -m pytest" in first
    assert "session" not in README.lower()  # it describes the software, not how it was made


def test_ci_runs_the_readme_test_command_in_a_virtual_environment():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    (command,) = [line for line in first.splitlines() if "pytest" in line]
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    ci = (REPO_DIR / ".ci" / "run").read_text()
    (line,) = [line for line in ci.splitlines() if "pytest" in line and not line.startswith("#")]
    assert line.startswith(command.replace("pip install -e", "pip install -q -e")), (line, command)


def test_every_command_has_a_worked_example():
    from typer.main import get_command

    from dh_mlx.cli import app
    root = get_command(app)
    wanted = set()
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", None)
        wanted |= {f"{name} {s}" for s in subs} if subs else {name}
    shown = {" ".join(w[1:3]) if len(w) > 2 and f"{w[1]} {w[2]}" in wanted else w[1] for w in _bash_commands(README)
             if w[0] == "dh-mlx" and len(w) > 1}
    assert wanted == {"train", "generate", "chat", "info", "plot", "quantize", "lora", "fuse", "tokenizer train",
                      "data prepare",
                      "convert gguf", "convert mlx", "convert hf", "convert import", "domains add",
                      "domains remove", "domains extract", "serve"}
    assert wanted <= shown, wanted - shown


def test_the_examples_write_under_runs_or_exports():
    ignored = (REPO_DIR / ".gitignore").read_text().split()
    assert "/runs/" in ignored and "/exports/" in ignored
    outs = []
    for words in _bash_commands(README):
        for flag in ("--out", "--out-dir"):
            if flag in words:
                outs.append(words[words.index(flag) + 1])
    assert len(outs) >= 10
    assert all(o.split("/")[0] in ("runs", "exports") for o in outs), outs


def _sections() -> dict[str, str]:
    parts = re.split(r"^## ", BENCHMARKS, flags=re.M)[1:]
    return {p.splitlines()[0]: p for p in parts}


def test_each_benchmark_has_its_current_figure_with_command_machine_commit_and_date():
    sections = _sections()
    scripts = sorted(p.name for p in (REPO_DIR / "benchmarks").glob("*.py"))
    for script in scripts:
        (title,) = [t for t in sections if f"benchmarks/{script}" in t]
        body = sections[title]
        assert f"python benchmarks/{script}" in body, script
        if "Not yet measured" in body:
            continue
        machines = re.findall(r"^Machine: (.+?) · commit ([0-9a-f]{7,})(?:.*?) · (\d{4}-\d{2}-\d{2})", body, re.M)
        assert machines, script
        for cpu, commit, date in machines:
            assert "cores" in cpu, script
    assert "session" not in BENCHMARKS.lower()


def test_the_attributed_commits_exist():
    if not (REPO_DIR / ".git").exists():
        pytest.skip("not a git checkout")
    commits = set(re.findall(r"commit ([0-9a-f]{7,})", BENCHMARKS))
    commits |= set(re.findall(r"and ([0-9a-f]{7,}) \(", BENCHMARKS))
    for c in commits:
        assert subprocess.run(["git", "cat-file", "-e", f"{c}^{{commit}}"], cwd=REPO_DIR).returncode == 0, c


def test_the_seam_table_lists_every_replaceable_operation():
    """docs/architecture.md's seam table names each operation the package marks `@replaceable`."""
    marked = set()
    for path in (REPO_DIR / "dh_mlx").rglob("*.py"):
        marked |= set(re.findall(r'^@replaceable\("(\w+)"\)', path.read_text(), flags=re.M))
    doc = (REPO_DIR / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## The seam"):doc.index("## Setup")]
    listed = {name for row in table.splitlines() if row.startswith("| `") for name in
              re.findall(r"`(\w+)`", row.split(" | ")[0])}
    assert len(marked) >= 12 and marked == listed, (marked ^ listed)
