"""`dh-mlx plot RUN_DIR`: loss curves and a per-domain expert-load heatmap from metrics.jsonl (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import write_atomic


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (is {run_dir} a training run directory?)")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON: {e.msg}") from None
    if not records:
        raise ValueError(f"{path}: empty (the run has not finished a step yet)")
    return records


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png and expert_load.png into the run directory; returns their paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib (or 'dh-mlx[plot]')") from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["ce"] for r in records], label="train cross-entropy", lw=1)
    if any(r.get("mtp") for r in records):
        ax.plot(steps, [r["mtp"] for r in records], label="train MTP cross-entropy", lw=1, alpha=0.7)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(f"{run_dir.name}: loss")
    ax.legend()
    fig.tight_layout()
    out.append(run_dir / "loss.png")
    write_atomic(out[-1], lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    loads = [r for r in val if r.get("domain_load")]
    if loads:
        load = loads[-1]["domain_load"]  # rows: 'none' then each domain
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
        names = ["(none)"] + list((config.get("domain_routing") or {}).get("domains", []))
        names += [f"domain {i}" for i in range(len(names), len(load))]
        rows = [(n, row) for n, row in zip(names, load) if sum(row) > 0]
        shares = [[v / sum(row) for v in row] for _, row in rows]
        fig, ax = plt.subplots(figsize=(min(2 + 0.3 * len(shares[0]), 16), 1 + 0.45 * len(rows)))
        im = ax.imshow(shares, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(rows)), [n for n, _ in rows])
        ax.set_xlabel("routed expert")
        ax.set_title(f"share of each domain's expert choices (validation, step {loads[-1]['step']})")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        out.append(run_dir / "expert_load.png")
        write_atomic(out[-1], lambda f: fig.savefig(f, dpi=120, format="png"))
        plt.close(fig)
    return out
